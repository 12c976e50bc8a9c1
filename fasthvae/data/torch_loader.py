"""The baseline users know: ``torch.utils.data.DataLoader`` with workers, pinned memory and
torchvision's functional transforms on PIL images, over fasthvae's epoch order (so all loaders agree on it).
"""

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import functional as TF

from fasthvae.data.common import LoaderOptions, batches_per_epoch, epoch_generator, shard_order, shard_size
from fasthvae.data.sources import check_images

PREFETCH_FACTOR = 2  # batches each worker prepares ahead (torch's default)


class ArrayImageDataset(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] images as torchvision-style samples ``(augmented image tensor, index)``.

    Each epoch's augmentations are drawn up front per image (:meth:`draw`), so an image's crop and
    flip depend on (seed, epoch, index) only, not on which worker loads it or from which batch an
    epoch starts: worker counts agree, and a mid-epoch resume sees the same images.
    """

    def __init__(self, images: np.ndarray, options: LoaderOptions) -> None:
        self.images = check_images(images, "ArrayImageDataset")
        self.pad = options.pad_crop
        self.flip = options.flip
        self.flips = np.zeros(len(images), dtype=bool)
        self.offsets = np.full((len(images), 2), options.pad_crop)  # centred: no shift

    def draw(self, generator: torch.Generator) -> None:
        """This epoch's crop offsets and flips of every image."""
        n = len(self.images)
        if self.pad:
            self.offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator).numpy()
        if self.flip:
            self.flips = torch.randint(0, 2, (n,), generator=generator).bool().numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i])
        if self.pad:
            h, w = self.images.shape[1:3]
            oy, ox = (int(o) for o in self.offsets[i])
            image = TF.crop(TF.pad(image, [self.pad]), oy, ox, h, w)
        if self.flips[i]:
            image = TF.hflip(image)
        return TF.to_tensor(image), i


class EpochSampler(Sampler[int]):
    """This rank's shard of the epoch's order (see :func:`fasthvae.data.common.shard_order`), from
    batch ``start_batch`` on."""

    def __init__(self, n: int, options: LoaderOptions) -> None:
        self.n, self.options, self.epoch, self.start_batch = n, options, 0, 0

    def __iter__(self) -> Iterator[int]:
        order = shard_order(self.n, self.options, self.epoch)
        return iter(order[self.start_batch * self.options.batch_size :].tolist())

    def __len__(self) -> int:
        return max(0, shard_size(self.n, self.options) - self.start_batch * self.options.batch_size)


class TorchLoader:
    """``DataLoader`` batches moved to ``device`` (non-blocking from pinned memory on CUDA)."""

    def __init__(
        self,
        images: np.ndarray,
        options: LoaderOptions,
        device: str | torch.device = "cpu",
        num_workers: int = 2,
    ) -> None:
        self.options, self.device = options, torch.device(device)
        self.dataset = ArrayImageDataset(images, options)
        self.sampler = EpochSampler(len(self.dataset), options)
        # The DataLoader draws its workers' base seed from this generator, not the global RNG, which
        # stays the model's alone (so the noise is the same however the epoch was entered).
        self.generator = torch.Generator()
        # Batches the workers prepare ahead of the consumer: PREFETCH_FACTOR per worker.
        self.batches_in_flight = num_workers * PREFETCH_FACTOR
        self.loader = DataLoader(
            self.dataset,
            batch_size=options.batch_size,
            sampler=self.sampler,
            drop_last=options.drop_last,
            num_workers=num_workers,
            prefetch_factor=PREFETCH_FACTOR if num_workers else None,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,  # workers fork per epoch, with that epoch's augmentations
            generator=self.generator,
        )
        self.set_epoch(0)

    def __len__(self) -> int:
        return batches_per_epoch(self.sampler.n, self.options)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        # augmentations from seed + 1, as the resident loader's (the order uses seed itself)
        self.dataset.draw(epoch_generator(self.options.seed + 1, epoch, self.options.rank))
        self.generator.manual_seed(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        for x, idx in self.loader:
            yield x.to(self.device, non_blocking=True, memory_format=fmt), idx.to(self.device)
