"""glibc keeping freed memory in the process (fasthvae.training.allocator) and the trainer's option."""

import subprocess
import sys

import pytest

from fasthvae.training.allocator import is_glibc
from fasthvae.training.config import TrainConfig
from fasthvae.training.distributed import DistInfo
from fasthvae.training.runtime import resolve_runtime

pytestmark = pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's")

# Eight 2 MiB blocks from the C library's malloc (where PyTorch's CPU tensors come from) written
# and freed, again and again, first with glibc's thresholds at their initial 128 KiB (each block is
# mapped and unmapped, its 512 pages faulted in anew every time; glibc's own rule raises them as
# blocks are freed, which makes its fault count depend on the heap's history), then with freed
# memory kept. No torch in the process: it starts in a fraction of a second.
ALLOCATE_AND_FREE = """
import ctypes, resource
from fasthvae.training.allocator import keep_freed_memory, set_thresholds
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults_per_cycle():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [libc.malloc(2**21) for _ in range(8)]
        for block in blocks:
            libc.memset(block, 1, 2**21)
        for block in blocks:
            libc.free(block)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
assert set_thresholds(128 * 1024, 128 * 1024)
faults_per_cycle()
returned = faults_per_cycle()
assert keep_freed_memory()
faults_per_cycle()
print(returned, faults_per_cycle())
"""


def test_kept_freed_memory_is_not_faulted_in_again():
    command = [sys.executable, "-c", ALLOCATE_AND_FREE]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    returned, kept = map(float, done.stdout.split()[-2:])
    assert returned >= 4000, returned  # the 16 MiB (4096 pages) faulted in every cycle
    assert kept <= returned / 100, (kept, returned)


@pytest.mark.parametrize("keep", [True, False])
def test_the_runtime_records_whether_freed_memory_is_kept(keep):
    config = TrainConfig(keep_freed_memory=keep, device="cpu")
    assert resolve_runtime(config, DistInfo()).freed_memory_kept is keep
