"""Loaders and sources: coverage per epoch, augmentation, seeding, sharding, errors."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fasthvae.data import LOADERS, DataError, LoaderOptions, load_dataset, make_loader
from fasthvae.data.dali import dali_available, dali_gpu_problem
from fasthvae.data.torch_loader import PREFETCH_FACTOR

N, H, W = 203, 8, 12  # odd sizes: partial last batches, non-square images
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 is not installed")
ALL = [pytest.param(n, marks=needs_dali) if n == "dali" else n for n in LOADERS]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N, H, W, 3), dtype=np.uint8)


def loader(name, images, **kw):
    return make_loader(name, images, LoaderOptions(**{"batch_size": 32, **kw}), num_workers=0)


def epoch(ld, e: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ld.set_epoch(e)
    xs, idx = zip(*ld, strict=True)
    return torch.cat(xs), torch.cat(idx)


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_covers_each_image_once(name, images, drop_last):
    ld = loader(name, images, drop_last=drop_last)
    x, idx = epoch(ld)
    expected = N - N % 32 if drop_last else N
    assert len(idx) == expected and len(x) == expected
    assert idx.unique().numel() == expected, "an image came twice in one epoch"
    assert len(ld) == -(-expected // 32)
    assert x.shape[1:] == (3, H, W) and x.dtype == torch.float32
    torch.testing.assert_close(x, as_float(images)[idx], rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_flip_mirrors_only_when_asked(name, images):
    x, idx = epoch(loader(name, images, flip=True))
    ref = as_float(images)[idx]
    same = (x - ref).abs().amax((1, 2, 3)) < 1e-6
    mirrored = (x - ref.flip(-1)).abs().amax((1, 2, 3)) < 1e-6
    assert bool((same | mirrored).all()), "a flipped image is neither the image nor its mirror"
    assert 0.3 < mirrored.float().mean() < 0.7, "flips should happen about half the time"


@pytest.mark.parametrize("name", ALL)
def test_pad_crop_is_a_shifted_window(name, images):
    pad = 2
    x, idx = epoch(loader(name, images, pad_crop=pad))
    padded = torch.nn.functional.pad(as_float(images), (pad,) * 4)
    offsets = set()
    for img, i in zip(x, idx, strict=True):
        hit = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(img, padded[i, :, dy : dy + H, dx : dx + W], atol=1e-6)
        ]
        assert hit, f"image {int(i)} is not a crop of its padded self"
        offsets.add(hit[0])
    assert len(offsets) > 10, f"crops barely move: offsets {sorted(offsets)}"


@pytest.mark.parametrize("name", ALL)
def test_seed_fixes_the_order_and_epochs_reshuffle(name, images):
    a = epoch(loader(name, images, seed=1))[1]
    b = epoch(loader(name, images, seed=1))[1]
    c = epoch(loader(name, images, seed=2))[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ld = loader(name, images, seed=1)
    assert not torch.equal(epoch(ld, 0)[1], epoch(ld, 1)[1])
    assert torch.equal(epoch(ld, 0)[1], a), "going back to an epoch gives its order again"
    assert torch.equal(epoch(loader(name, images, shuffle=False))[1], torch.arange(N))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_cover(name, images, world_size):
    shards = [
        epoch(loader(name, images, rank=r, world_size=world_size, seed=5))[1] for r in range(world_size)
    ]
    joined = torch.cat(shards)
    assert len(joined) == N and joined.unique().numel() == N
    dropped = [
        len(loader(name, images, rank=r, world_size=world_size, drop_last=True)) for r in range(world_size)
    ]
    assert len(set(dropped)) == 1, "with drop_last every rank must run the same number of steps"


def test_channels_last(images):
    x, _ = next(iter(loader("resident", images, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_the_resident_loader_on_a_cpu_reads_the_callers_array_in_place(images):
    """No copy of the data set on a CPU, flips included (each batch is flipped as it is gathered);
    a read-only array (as a memory-mapped one is) is read without a warning."""
    assert loader("resident", images, flip=True).data.data_ptr() == images.ctypes.data
    readonly = images.copy()
    readonly.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, idx = next(iter(loader("resident", readonly, flip=True)))
    plain = as_float(images[idx.numpy()])
    same, mirrored = ((x == y).flatten(1).all(1) for y in (plain, plain.flip(-1)))
    assert (same | mirrored).all() and mirrored.any(), "each image as it is or mirrored"


def test_torch_loader_with_workers(images):
    options = LoaderOptions(batch_size=64, flip=True, pad_crop=2)
    with_workers = epoch(make_loader("torch", images, options, num_workers=2), 3)
    assert with_workers[1].unique().numel() == N
    in_process = epoch(make_loader("torch", images, options, num_workers=0), 3)
    assert all(torch.equal(a, b) for a, b in zip(with_workers, in_process, strict=True)), (
        "an image's augmentation depends on (seed, epoch, index), not on the worker that loads it"
    )


@pytest.mark.parametrize("name", ALL)
def test_each_loader_says_how_many_batches_it_prepares_ahead(name, images):
    """What a timed window draws untimed first: the DataLoader's workers' prefetch, DALI's queue,
    nothing for the resident loader (it gathers a batch when asked)."""
    options = LoaderOptions(batch_size=32)
    expected = {"resident": 0, "torch": 3 * PREFETCH_FACTOR, "dali": 2}[name]
    assert make_loader(name, images, options, num_workers=3).batches_in_flight == expected


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("start", [1, 3, 6])
def test_an_epoch_started_mid_way_yields_its_remaining_batches(name, images, start):
    """What a mid-epoch resume relies on: set_epoch(e, start_batch=k) gives batches k, k+1, ... of
    epoch e, augmentations included (DALI: same images in the same batches; its flips and crops
    come from the pipeline's running RNG, so augmentation is off for it here)."""
    augment = {} if name == "dali" else {"flip": True, "pad_crop": 2}
    whole = loader(name, images, seed=4, **augment)
    whole.set_epoch(2)
    expected = list(whole)[start:]
    part = loader(name, images, seed=4, **augment)
    part.set_epoch(2, start_batch=start)
    got = list(part)
    assert len(got) == len(expected) == 7 - start
    for (x, i), (ex, ei) in zip(got, expected, strict=True):
        assert torch.equal(i, ei) and torch.equal(x, ex)


def test_unknown_loader_and_bad_options(images):
    with pytest.raises(ValueError, match="unknown loader"):
        make_loader("fast", images, LoaderOptions(batch_size=4))
    with pytest.raises(ValueError, match="rank"):
        LoaderOptions(batch_size=4, rank=2, world_size=2)
    with pytest.raises(DataError, match="uint8"):
        make_loader("resident", images.astype(np.float32), LoaderOptions(batch_size=4))
    with pytest.raises(DataError, match=r"\[N, H, W, 3\]"):
        make_loader("resident", images[..., :1], LoaderOptions(batch_size=4))


# ---- sources


def write_npz(path, images, **override):
    arrays = {
        "x_train": images,
        "y_train": np.arange(len(images)) % 10,
        "x_test": images[:7],
        "y_test": np.zeros(7, np.int64),
        **override,
    }
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_source(tmp_path, images):
    ds = load_dataset(write_npz(tmp_path / "d.npz", images))
    assert np.array_equal(ds.train.images, images) and len(ds.test) == 7
    assert ds.train.labels.dtype == np.int64
    assert len(ds.train.limit(10)) == 10


def test_npz_errors(tmp_path, images):
    with pytest.raises(DataError, match="missing arrays"):
        load_dataset(write_npz(tmp_path / "a.npz", images, y_test=None))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(write_npz(tmp_path / "b.npz", images.astype(np.float32)))
    with pytest.raises(DataError, match="labels"):
        load_dataset(write_npz(tmp_path / "c.npz", images, y_train=np.zeros(3)))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_dataset(corrupt)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"\.npz"):
        load_dataset(tmp_path / "x.txt")


def test_cifar_folder_source(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batches[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name], "labels": list(range(4))}, f)
    ds = load_dataset(tmp_path)  # the parent folder is accepted too
    assert ds.train.images.shape == (20, 32, 32, 3) and ds.test.images.shape == (4, 32, 32, 3)
    first = batches["data_batch_1"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(ds.train.images[0], first)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(folder)


def test_offline_without_data_names_the_fix(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.delenv("FASTHVAE_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="--data PATH"):
        load_dataset(root=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(root=tmp_path, download=False)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2)
    for i in range(23):
        sub = root / f"class{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    (root / "class0" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_source(image_folder):
    ds = load_dataset(image_folder, image_size=8)  # resized from 16x16
    assert ds.train.images.shape == (21, 8, 8, 3) and len(ds.test) == 2
    assert len(ds.files) == 21 and set(ds.train.labels.tolist()) == {0, 1}


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_dataset(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="not a readable image"):
        load_dataset(tmp_path)


def test_dali_names_why_it_cannot_use_the_gpu():
    """Without a usable GPU (or without DALI) the check returns the reason instead of raising, so a
    GPU test skips with it."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the GPU tests run DALI there")
    problem = dali_gpu_problem()
    assert isinstance(problem, str) and problem


@needs_dali
def test_dali_image_folder_reads_every_file_once(image_folder):
    from fasthvae.data.dali import DaliFolderLoader

    ds = load_dataset(image_folder, image_size=16)
    ld = DaliFolderLoader(ds.files, LoaderOptions(batch_size=8, seed=3), size=16)
    for e in range(2):
        x, idx = epoch(ld, e)
        assert x.shape == (21, 3, 16, 16) and sorted(idx.tolist()) == list(range(21))
        torch.testing.assert_close(x, as_float(ds.train.images)[idx], rtol=0, atol=1e-6)
    window = DaliFolderLoader(ds.files, LoaderOptions(batch_size=8, seed=3), size=16, shuffle_buffer=4)
    orders = [epoch(window, e)[1].tolist() for e in range(2)]  # a shuffle window smaller than the folder
    assert all(sorted(order) == list(range(21)) for order in orders) and orders[0] != list(range(21))
    small = DaliFolderLoader(ds.files, LoaderOptions(batch_size=8), size=8)
    x, idx = epoch(small)
    resized = as_float(load_dataset(image_folder, image_size=8).train.images)[idx]
    assert x.shape == (21, 3, 8, 8)
    assert (x - resized).abs().mean() < 4 / 255, "DALI's resize should agree with PIL's on average"
