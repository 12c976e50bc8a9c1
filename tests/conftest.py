"""Test set-up: Triton runs in its interpreter on CPU-only machines (set before triton is imported),
pytest-xdist workers share the cores, the small data set that trainer and study tests share, a
fresh cache for speed choices; ``slow`` tests run only with ``--slow``, and ``gpu`` tests only where
torch sees a CUDA GPU (skipped with the reason elsewhere)."""

import os
import tempfile

import numpy as np
import pytest
import torch

from fasthvae.ops import multi_tensor
from tests.helpers import CIFAR10

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist the workers share the cores: each runs torch (and the processes its tests start)
# on its share of them, not on all of them at once.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
# The tests' speed choices are cached apart from the user's (~/.cache/fasthvae), in a fresh folder.
os.environ["FASTHVAE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fasthvae-tests-")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow = pytest.mark.skip(reason="slow: run with --slow")
    gpu = pytest.mark.skip(reason="needs a CUDA GPU: bash scripts/gpu_check.sh runs it")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--slow"):
            item.add_marker(slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(gpu)


@pytest.fixture(scope="session")
def cifar10_npz() -> str:
    """The real CIFAR-10 .npz (skips the test where the checkout has no ../shared beside it)."""
    if not CIFAR10.is_file():
        pytest.skip(f"the shared CIFAR-10 file is not here ({CIFAR10})")
    return str(CIFAR10)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> str:
    """The first 256 real CIFAR-10 images when the shared file is there, generated images otherwise."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    if CIFAR10.is_file():
        with np.load(CIFAR10) as f:
            x, y, xt, yt = f["x_train"][:256], f["y_train"][:256], f["x_test"][:64], f["y_test"][:64]
    else:
        rng = np.random.default_rng(0)
        x, xt = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (256, 64))
        y, yt = np.zeros(256, np.int64), np.zeros(64, np.int64)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return str(path)


@pytest.fixture
def loops_taken(monkeypatch) -> list[bool]:
    """Each call's choice: True where the CPU loops ran, False where torch's foreach ops did."""
    taken, choose = [], multi_tensor._loops_take
    monkeypatch.setattr(multi_tensor, "_loops_take", lambda *lists: taken.append(choose(*lists)) or taken[-1])
    return taken
