"""The device-resident loader: the whole uint8 dataset is one tensor on the training device; batches
are gathered with a device-side index and augmented there (no workers, no host copies per batch).
"""

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


def to_float(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 in [0, 1] (x / 255, as torchvision's ToTensor)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(torch.float32, memory_format=fmt).div_(255)


class ResidentLoader:
    """Batches gathered from a uint8 tensor that lives on ``device``.

    With ``flip`` the tensor also holds every image mirrored (twice the memory: 300 MB for
    CIFAR-10), so a flipped batch is one gather: image ``i`` or its mirror at ``i + N``.
    """

    def __init__(
        self, images: np.ndarray, options: LoaderOptions, device: str | torch.device = "cpu"
    ) -> None:
        check_images(images, "ResidentLoader")
        self.options = options
        self.device = torch.device(device)
        data = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).contiguous()
        self.n = len(data)
        self.data = torch.cat([data, data.flip(-1)]) if options.flip else data
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
            rows = idx
            if opt.flip:  # pick the mirrored copy with probability 1/2
                rows = idx + self.n * torch.randint(0, 2, idx.shape, generator=gen, device=self.device)
            if i < self.start_batch:  # resuming mid-epoch: the skipped batches' draws, not their work
                if opt.pad_crop:
                    crop_offsets(len(idx), opt.pad_crop, gen, self.device)
                continue
            x = self.data.index_select(0, rows)
            if opt.pad_crop:
                x = random_pad_crop(x, opt.pad_crop, gen)
            yield to_float(x, opt.channels_last), idx
