"""The baseline users know: ``torch.utils.data.DataLoader`` with workers, pinned memory and
torchvision transforms on PIL images, over fasthvae's epoch order (so all loaders agree on it).
"""

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms

from fasthvae.data.common import LoaderOptions, batches_per_epoch, epoch_seed, shard_order, shard_size
from fasthvae.data.sources import check_images


class ArrayImageDataset(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] images as torchvision-style samples ``(transform(PIL image), index)``."""

    def __init__(self, images: np.ndarray, transform) -> None:
        self.images = check_images(images, "ArrayImageDataset")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), i


class EpochSampler(Sampler[int]):
    """This rank's shard of the epoch's order (see :func:`fasthvae.data.common.shard_order`)."""

    def __init__(self, n: int, options: LoaderOptions) -> None:
        self.n, self.options, self.epoch = n, options, 0

    def __iter__(self) -> Iterator[int]:
        return iter(shard_order(self.n, self.options, self.epoch).tolist())

    def __len__(self) -> int:
        return shard_size(self.n, self.options)


def torchvision_transform(options: LoaderOptions, size: tuple[int, int]) -> transforms.Compose:
    steps = []
    if options.pad_crop:
        steps.append(transforms.RandomCrop(size, padding=options.pad_crop))
    if options.flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


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
        dataset = ArrayImageDataset(images, torchvision_transform(options, tuple(images.shape[1:3])))
        self.sampler = EpochSampler(len(dataset), options)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=options.batch_size,
            sampler=self.sampler,
            drop_last=options.drop_last,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=self.generator,
        )
        # Workers restart every epoch, seeded from (seed, epoch): augmentations are reproducible per
        # epoch, so a resumed run flips the same images as an uninterrupted one.
        self.set_epoch(0)

    def __len__(self) -> int:
        return batches_per_epoch(self.sampler.n, self.options)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch
        # augmentations from seed + 1, as the resident loader's (the order uses seed itself)
        self.generator.manual_seed(epoch_seed(self.options.seed + 1, epoch, self.options.rank))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.options.channels_last else torch.contiguous_format
        for x, idx in self.loader:
            yield x.to(self.device, non_blocking=True, memory_format=fmt), idx.to(self.device)
