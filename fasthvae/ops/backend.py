"""Which kernels run the fused ops: selection, availability and the loaded extension.

Backends: ``triton`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (the CUDA
C++ kernels of ``fasthvae._C``), ``cpu`` (the CPU C++ kernels of ``fasthvae._C``) and
``reference`` (plain PyTorch). ``auto`` picks triton, then cuda, then reference on CUDA tensors,
and cpu, then reference on CPU tensors. Choose with ``FASTHVAE_BACKEND`` or :func:`set_backend`.
Float64 inputs always run the reference kernels (the fused kernels compute in float32).

The ``cpu`` kernels are compiled for three x86-64 ISA levels (``avx512``, ``avx2``, ``baseline``)
and run the best one the CPU has; ``FASTHVAE_CPU_ISA`` or :func:`set_cpu_isa` picks another that
it has (so every path is testable on a machine that has it).
"""

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_selected = os.environ.get("FASTHVAE_BACKEND", "auto").lower()
if _selected not in BACKENDS:
    raise ValueError(f"FASTHVAE_BACKEND must be one of {BACKENDS}, got {_selected!r}")


def set_backend(name: str) -> None:
    """Select the backend for every later call (``auto``, ``triton``, ``cuda``, ``cpu``, ``reference``)."""
    global _selected
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _selected = name


def get_backend() -> str:
    return _selected


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _cpu_kernels() -> ModuleType:
    ext = extension()
    if ext is None:
        raise RuntimeError("fasthvae: the C++ extension is not loaded, so there are no CPU kernels")
    return ext


def cpu_isa() -> str:
    """The ISA path the CPU kernels run: ``avx512``, ``avx2`` or ``baseline``."""
    return _cpu_kernels().cpu_isa()


def cpu_isas() -> list[str]:
    """Every ISA path this CPU can run, best first."""
    return list(_cpu_kernels().cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Run the CPU kernels' ``name`` path (``""``: the best); a path the CPU lacks is an error."""
    _cpu_kernels().set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_isa`."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


_extension_loaded = False  # fasthvae._C imported (extension() sets it; fasthvae.ops's import calls it)


@functools.cache
def extension() -> ModuleType | None:
    """The compiled ``fasthvae._C``, or None (with one warning) when it is missing or broken."""
    global _extension_loaded
    try:
        module = importlib.import_module("fasthvae._C")
        _extension_loaded = True
        return module
    except ImportError as err:
        warnings.warn(
            f"fasthvae: the C++ extension could not be loaded ({err}); using the PyTorch reference "
            "kernels. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def cpu_kernels_run(t: torch.Tensor) -> bool:
    """Whether ``fasthvae._C``'s CPU kernels run a call on ``t`` (``resolve`` naming ``cpu``), in what
    torch.compile traces without a graph break: ``resolve``'s ``extension()`` call breaks the graph,
    a module flag does not."""
    return (
        _extension_loaded
        and t.device.type == "cpu"
        and t.dtype in FUSED_DTYPES
        and _selected in ("auto", "cpu")
    )


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_kernels() -> ModuleType | None:
    """``fasthvae.ops.triton_kernels``, or None when Triton is not installed."""
    try:
        return importlib.import_module("fasthvae.ops.triton_kernels")
    except ImportError:
        return None


def available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device``."""
    if name == "reference":
        return True
    if name == "triton":
        return triton_kernels() is not None and (device.type == "cuda" or triton_interpreted())
    ext = extension() if name in ("cpu", "cuda") else None
    if name == "cpu":
        return ext is not None and device.type == "cpu"
    if name == "cuda":
        return ext is not None and device.type == "cuda" and ext.has_cuda()
    return False


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call on ``device`` with ``dtype`` under the current selection."""
    if dtype not in FUSED_DTYPES:
        return "reference"
    name = _selected
    if name == "auto":
        order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        return next((n for n in order if available(n, device)), "reference")
    if not available(name, device):
        raise RuntimeError(
            f"fasthvae: backend {name!r} is not available for {device.type} tensors "
            f"(see fasthvae.ops.backend; TRITON_INTERPRET=1 runs triton on CPU)"
        )
    return name
