"""The device-resident loader: the whole uint8 dataset is one tensor on the training device; batches
are gathered with a device-side index and augmented there (no workers, no host copies per batch).
"""

import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fasthvae.data.common import LoaderOptions, batch_slices, batches_per_epoch, epoch_generator, shard_order
from fasthvae.data.sources import check_images


def crop_offsets(
    b: int, pad: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets [b, 1] of a random crop, uniform in [0, 2 * pad]."""
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    return oy, ox


def random_pad_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``pad`` and crop it back to its size at a uniform random offset."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy, ox = crop_offsets(b, pad, generator, x.device)
    rows = (oy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def to_float(x: torch.Tensor, channels_last: bool, divisor: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 in [0, 1] (x / 255, as torchvision's ToTensor), the same bits
    on every device: ``divisor`` is 255 as a tensor on x's device (:func:`byte_divisor`)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(torch.float32, memory_format=fmt).div_(divisor)


def byte_divisor(device: torch.device) -> torch.Tensor:
    """255 on ``device``, a true division's divisor: CUDA divides by a Python number as a product
    with its reciprocal, which differs from x / 255 in the last bit for 126 of the 256 values."""
    return torch.full((), 255.0, device=device)  # a fill, not a host-to-device copy


class ResidentLoader:
    """Batches gathered from the uint8 images [N, H, W, 3] as one tensor on ``device``: on a CPU the
    caller's array itself (no copy), elsewhere one copy on the device. A batch is one gather, then
    its flips, crops and the conversion to float [B, 3, H, W]."""

    def __init__(
        self, images: np.ndarray, options: LoaderOptions, device: str | torch.device = "cpu"
    ) -> None:
        images = np.ascontiguousarray(check_images(images, "ResidentLoader"))
        self.options = options
        self.device = torch.device(device)
        with warnings.catch_warnings():  # a read-only array (a memory map) is only ever read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.data = torch.from_numpy(images).to(self.device)
        self.divisor = byte_divisor(self.device)
        self.n = len(self.data)
        self.epoch, self.start_batch = 0, 0
        self.batches_in_flight = 0  # each batch is gathered when asked for

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.options)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        opt = self.options
        order = shard_order(self.n, opt, self.epoch).to(self.device)
        gen = epoch_generator(opt.seed + 1, self.epoch, opt.rank, self.device)
        for i, idx in enumerate(batch_slices(order, self.n, opt)):
            flips = None
            if opt.flip:  # each image mirrored with probability 1/2
                flips = torch.randint(0, 2, idx.shape, generator=gen, device=self.device)
            if i < self.start_batch:  # resuming mid-epoch: the skipped batches' draws, not their work
                if opt.pad_crop:
                    crop_offsets(len(idx), opt.pad_crop, gen, self.device)
                continue
            x = self.data.index_select(0, idx)  # [B, H, W, 3]
            if flips is not None:  # the batch and its mirror side by side, image b's mirror at b + B
                pick = torch.arange(len(x), device=self.device) + len(x) * flips
                x = torch.cat([x, x.flip(2)]).index_select(0, pick)
            x = x.permute(0, 3, 1, 2)  # [B, 3, H, W], channels_last in memory
            if opt.pad_crop:
                x = random_pad_crop(x, opt.pad_crop, gen)
            yield to_float(x, opt.channels_last, self.divisor), idx
