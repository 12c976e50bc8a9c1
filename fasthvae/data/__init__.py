"""Data: sources (CIFAR-10 ``.npz`` / torchvision folder / image folder) and three loaders with one
interface, yielding ``(images, indices)`` with float images [B, 3, H, W] in [0, 1] on the device.

- ``dali``: NVIDIA DALI pipeline (GPU operators on CUDA, CPU operators otherwise)
- ``resident``: the whole uint8 dataset on the device, gathered and augmented there
- ``torch``: ``torch.utils.data.DataLoader`` with workers and torchvision transforms (the baseline)
"""

import torch

from fasthvae.data.common import BatchLoader, LoaderOptions, image_batches
from fasthvae.data.sources import DataError, Dataset, FileSplit, ImageSplit, load_dataset

LOADERS = ("dali", "resident", "torch")
# The default on every device: no host copies and no worker processes. On a CPU a batch of 32 takes
# it ~0.1 ms, while the DataLoader's workers spend milliseconds of CPU on it, on the cores the step
# runs on (results/bench/README.md, "The loader on a CPU").
DEFAULT_LOADER = "resident"

__all__ = [
    "DEFAULT_LOADER",
    "LOADERS",
    "BatchLoader",
    "DataError",
    "Dataset",
    "FileSplit",
    "ImageSplit",
    "LoaderOptions",
    "image_batches",
    "load_dataset",
    "make_loader",
]


def make_loader(
    name: str, images, options: LoaderOptions, device: str | torch.device = "cpu", num_workers: int = 2
) -> BatchLoader:
    """A loader by name over uint8 images [N, H, W, 3], or (``dali`` only) over a FileSplit's image
    files, decoded and resized to 32 x 32 on the fly."""
    if isinstance(images, FileSplit):
        if name != "dali":
            raise ValueError(f"image files on disk need --loader dali (the {name} loader reads arrays)")
        from fasthvae.data.dali import DaliFolderLoader

        return DaliFolderLoader(images.files, options, device=device, num_threads=max(1, num_workers))
    if name == "resident":
        from fasthvae.data.resident import ResidentLoader

        return ResidentLoader(images, options, device)
    if name == "torch":
        from fasthvae.data.torch_loader import TorchLoader

        return TorchLoader(images, options, device, num_workers=num_workers)
    if name == "dali":
        from fasthvae.data.dali import DaliLoader

        return DaliLoader(images, options, device, num_threads=max(1, num_workers))
    raise ValueError(f"unknown loader {name!r}; choose one of {', '.join(LOADERS)}")
