"""Where images come from: CIFAR-10 (``.npz`` or torchvision's folder, downloaded on request) or an
image folder. Every source ends as uint8 arrays [N, H, W, 3] in memory, which every loader reads;
but an image folder's training split can stay on disk for DALI to decode as it reads (FileSplit).
"""

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("data")
CIFAR_FOLDER = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DATA_ENV = "FASTHVAE_DATA"


class DataError(ValueError):
    """A data source is missing or malformed; the message says what was expected and found."""


@dataclass(frozen=True)
class ImageSplit:
    """One split: uint8 images [N, H, W, 3] and int64 labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def limit(self, n: int | None) -> "ImageSplit":
        """The first ``n`` images (all when ``n`` is None)."""
        if n is None:
            return self
        if n <= 0:
            raise DataError(f"limit must be positive, got {n}")
        return ImageSplit(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class FileSplit:
    """A split left on disk: image files and their labels, decoded by the loader as it reads them
    (DALI: for image folders larger than memory)."""

    files: tuple[Path, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    def limit(self, n: int | None) -> "FileSplit":
        """The first ``n`` files (all when ``n`` is None)."""
        if n is None:
            return self
        if n <= 0:
            raise DataError(f"limit must be positive, got {n}")
        return FileSplit(self.files[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    """A training and a test split, and where they were read from."""

    train: ImageSplit | FileSplit
    test: ImageSplit
    source: str
    files: tuple[Path, ...] = ()  # the image files of an image folder, in index order


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    """Demand uint8 [N, H, W, 3]; name what was found otherwise."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        found = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{what}: expected uint8 images, found {found}")
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise DataError(f"{what}: expected images of shape [N, H, W, 3] with N > 0, found {images.shape}")
    return images


def _split(images: np.ndarray, labels: np.ndarray, what: str) -> ImageSplit:
    images = check_images(images, what)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{what}: {len(images)} images but {len(labels)} labels")
    return ImageSplit(images, labels)


def load_npz(path: Path) -> Dataset:
    """An ``.npz`` with ``x_train, y_train, x_test, y_test`` (uint8 NHWC images)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)} (found {sorted(f.files)})")
            train = _split(f["x_train"], f["y_train"], f"{path}:x_train")
            test = _split(f["x_test"], f["y_test"], f"{path}:x_test")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    return Dataset(train, test, f"npz:{path}")


def _read_cifar_batches(folder: Path, names: list[str]) -> ImageSplit:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{folder}: missing CIFAR-10 batch file {name!r}")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry["labels"]))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise DataError(f"{path}: corrupt CIFAR-10 batch ({err!r})") from err
    return _split(
        np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)),
        np.concatenate(labels),
        str(folder),
    )


def load_cifar_folder(folder: Path) -> Dataset:
    """torchvision's ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``)."""
    train = _read_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    test = _read_cifar_batches(folder, ["test_batch"])
    return Dataset(train, test, f"cifar-folder:{folder}")


def download_cifar10(root: Path) -> Path:
    """torchvision's download of CIFAR-10 into ``root``; a clear error when offline."""
    import torchvision

    try:
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as err:  # urllib raises many kinds; all mean the same thing to the user
        raise DataError(
            f"CIFAR-10 is not in {root}/{CIFAR_FOLDER} and could not be downloaded ({err}). "
            f"Pass --data PATH (an .npz with x_train/y_train/x_test/y_test, a {CIFAR_FOLDER} folder "
            f"or an image folder) or set {DATA_ENV}."
        ) from err
    return root / CIFAR_FOLDER


def load_image_folder(
    folder: Path, size: int = 32, test_fraction: float = 0.1, decode_train: bool = True
) -> Dataset:
    """Every image under ``folder`` (recursively, sorted), resized to ``size`` x ``size`` RGB.

    The last ``test_fraction`` of the sorted files form the test split. Labels are the index of the
    image's parent folder among the sorted parent folders. With ``decode_train=False`` the training
    split stays on disk as a :class:`FileSplit` (only the test images are decoded).
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    parents = sorted({p.parent for p in files})
    label_of = {p: i for i, p in enumerate(parents)}
    labels = np.array([label_of[p.parent] for p in files], dtype=np.int64)
    n_test = int(len(files) * test_fraction) if len(files) > 1 else 0
    cut = len(files) - n_test
    test_files = files[cut:] if n_test else files[:1]
    test = ImageSplit(_decode(test_files, size), labels[cut:] if n_test else labels[:1])
    if decode_train:
        train: ImageSplit | FileSplit = ImageSplit(_decode(files[:cut], size), labels[:cut])
    else:
        train = FileSplit(tuple(files[:cut]), labels[:cut])
    return Dataset(train, test, f"image-folder:{folder}", tuple(files[:cut]))


def _decode(files: list[Path], size: int) -> np.ndarray:
    """uint8 [N, size, size, 3] RGB images of ``files`` (bilinear resize where needed)."""
    from PIL import Image, UnidentifiedImageError

    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
                images[i] = np.asarray(im)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from err
    return images


def load_dataset(
    data: str | os.PathLike | None = None,
    root: str | os.PathLike = DEFAULT_ROOT,
    download: bool = True,
    image_size: int = 32,
    decode_train: bool = True,
) -> Dataset:
    """Resolve ``data`` (or ``$FASTHVAE_DATA``, or CIFAR-10 under ``root``) into a :class:`Dataset`.

    ``data`` may be an ``.npz`` file, a ``cifar-10-batches-py`` folder (or a folder holding one),
    or a folder of images. With nothing given, CIFAR-10 is read from (or downloaded into) ``root``.
    ``decode_train=False`` leaves an image folder's training images on disk (see FileSplit).
    """
    data = data if data is not None else os.environ.get(DATA_ENV)
    if data is None:
        folder = Path(root) / CIFAR_FOLDER
        if not folder.is_dir():
            if not download:
                raise DataError(f"no data: {folder} does not exist; pass --data PATH or set {DATA_ENV}")
            folder = download_cifar10(Path(root))
        return load_cifar_folder(folder)
    path = Path(data)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder (expected an .npz, a {CIFAR_FOLDER} folder or images)"
        )
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: expected an .npz file with x_train/y_train/x_test/y_test")
        return load_npz(path)
    for candidate in (path, path / CIFAR_FOLDER):
        if (candidate / "data_batch_1").is_file():
            return load_cifar_folder(candidate)
    return load_image_folder(path, size=image_size, decode_train=decode_train)
