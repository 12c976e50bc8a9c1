"""``fasthvae env``: what a bug report needs, in one block to paste."""

import importlib
import importlib.metadata
import os
import platform
import sys

import torch

from fasthvae.hardware import ISA_CAP_ENVS, cpu_flags, cpu_name
from fasthvae.ops import backend
from fasthvae.version import __version__

PACKAGES = ("torch", "torchvision", "triton", "nvidia-dali-cuda130", "torch-fidelity", "tensorboard", "numpy")
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension() -> tuple[str, object | None]:
    """Whether fasthvae._C loads, and why not."""
    try:
        ext = importlib.import_module("fasthvae._C")
    except ImportError as err:
        return f"not loaded ({err}); rebuild: pip install --no-build-isolation -e .", None
    return f"loaded from {ext.__file__}", ext


def report() -> str:
    lines = [f"fasthvae {__version__} ({os.path.dirname(__file__)})"]
    lines.append(f"python {sys.version.split()[0]} on {platform.platform()}")
    lines += [f"{p}: {_version(p)}" for p in PACKAGES]
    cuda = torch.version.cuda or "none (CPU build)"
    lines.append(f"torch CUDA: {cuda}; GPU visible: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    flags = cpu_flags()
    lines.append(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores")
    lines.append(
        f"CPU SIMD: {' '.join(f for f in SIMD_FLAGS if f in flags) or 'none of ' + ', '.join(SIMD_FLAGS)}"
    )
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAP_ENVS if os.environ.get(name)]
    if caps:
        lines.append(f"  ISA caps: {' '.join(caps)}")
    status, ext = _extension()
    lines.append(f"C++ extension: {status}")
    if ext is not None:
        lines.append(f"  CUDA kernels compiled in: {ext.has_cuda()}")
        lines.append(
            f"  CPU ISA path: {backend.cpu_isa()} (this CPU can run: {', '.join(backend.cpu_isas())})"
        )
    lines.append(f"ops backend selected: {backend.get_backend()} (FASTHVAE_BACKEND)")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        chosen = {
            str(d).removeprefix("torch."): backend.resolve(torch.device(device), d)
            for d in backend.FUSED_DTYPES
        }
        lines.append(f"  runs on {device}: " + ", ".join(f"{d} -> {b}" for d, b in chosen.items()))
    lines.append(f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', 'unset')}")
    return "\n".join(lines)
