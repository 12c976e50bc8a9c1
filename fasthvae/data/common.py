"""What every loader shares: its options, the epoch's order of images, and DDP sharding.

A loader yields ``(images, indices)``: float images [B, 3, H, W] in [0, 1] on the loader's device
(channels_last when asked) and the int64 dataset indices of those images (for labels and tests).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are drawn. ``pad_crop`` is the zero padding of a random crop (0: no crop)."""

    batch_size: int
    shuffle: bool = True
    flip: bool = False
    pad_crop: int = 0
    drop_last: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.pad_crop < 0:
            raise ValueError(f"pad_crop must be >= 0, got {self.pad_crop}")


class BatchLoader(Protocol):
    """The interface of every loader. ``batches_in_flight``: the batches it prepares ahead of the
    consumer off the main thread (worker processes, DALI's prefetch queue; 0 for none), which a
    timed window lets untimed steps draw first (``fasthvae.training.speed.Feed``)."""

    options: LoaderOptions
    batches_in_flight: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields ``epoch``'s batches from ``start_batch`` on: the same batches
        an iteration from the start yields there (how a mid-epoch resume continues)."""
        ...


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The RNG seed of one (seed, epoch, rank): orders and augmentations are reproducible."""
    return (seed * 1_000_003 + epoch) * 4099 + rank


def epoch_generator(
    seed: int, epoch: int, rank: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator seeded with :func:`epoch_seed`."""
    return torch.Generator(device).manual_seed(epoch_seed(seed, epoch, rank))


def shard_order(n: int, options: LoaderOptions, epoch: int) -> torch.Tensor:
    """This rank's dataset indices for ``epoch``: one permutation of all ranks, dealt round-robin.

    Shards are disjoint and together cover the set; with ``drop_last`` every rank gets the same
    number of full batches (what DDP needs), otherwise shard sizes differ by at most one image.
    """
    if options.shuffle:
        order = torch.randperm(n, generator=epoch_generator(options.seed, epoch))
    else:
        order = torch.arange(n)
    return order[options.rank :: options.world_size]


def shard_size(n: int, options: LoaderOptions) -> int:
    """Images in this rank's shard of :func:`shard_order`."""
    return len(range(options.rank, n, options.world_size))


def batches_per_epoch(n: int, options: LoaderOptions) -> int:
    """Batches this rank yields per epoch."""
    if options.drop_last:
        return (n // options.world_size) // options.batch_size
    return math.ceil(shard_size(n, options) / options.batch_size)


def batch_slices(order: torch.Tensor, n: int, options: LoaderOptions) -> Iterator[torch.Tensor]:
    """The epoch's index batches for this rank (full batches first, a partial last unless dropped)."""
    bs = options.batch_size
    for i in range(batches_per_epoch(n, options)):
        yield order[i * bs : (i + 1) * bs]


def image_batches(images: np.ndarray, device: str | torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 images [N, H, W, 3] as float [B, 3, H, W] batches in [0, 1] on ``device``, in order."""
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2)
        yield x.float().div(255)
