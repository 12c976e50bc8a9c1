"""How the CPU allocator treats freed memory during training.

PyTorch allocates CPU tensors with the C library's malloc. glibc hands blocks above its mmap
threshold back to the kernel when they are freed, and trims the heap's free top above its trim
threshold; a training step that frees its activations and allocates the same sizes again in the
next step then faults every page in anew, each one zeroed by the kernel. Raising both thresholds
keeps freed memory in the process for reuse, as PyTorch's caching allocator does on a GPU: the
process holds on to its freed blocks of up to 32 MiB (larger ones still go back to the kernel) and
up to 1 GiB of free heap instead of returning them between steps.
"""

import ctypes
import platform

# mallopt's parameters (malloc.h) and glibc's ceiling for the mmap threshold on 64-bit systems.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 2**30  # free heap top kept before trimming (mallopt takes a C int)


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def set_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc's mmap and trim thresholds, fixed (glibc's own rule, which raises them as blocks are
    freed, stays off from then on in this process); True when both took, False off glibc."""
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)
    mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes) == 1
    trim_ok = libc.mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1
    return mmap_ok and trim_ok


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks up to 32 MiB in the process (no mmap/munmap per tensor) and
    not trim the heap below 1 GiB of free space; True when both settings took. A no-op (False)
    where the C library is not glibc."""
    return set_thresholds(MMAP_THRESHOLD_MAX, TRIM_THRESHOLD)
