"""What this machine is: the CPU's name and feature flags (all, and those an ISA cap leaves), its SIMD
level, and one line naming CPU, threads, GPU and torch (what a figure ran on, and what a cached speed
choice is keyed by)."""

import os
import platform
from pathlib import Path

import torch


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


# PyTorch's ISA cap: its kernels and Inductor's generated code use no wider vectors than this level.
# An AVX-512 machine measures its AVX2 paths with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2
# (oneDNN's convolutions), FASTHVAE_CPU_ISA=avx2 (fasthvae's kernels) and MKL_ENABLE_INSTRUCTIONS=AVX2
# (MKL's matrix products, the sgemm peak among them): docs/benchmarks.md.
ISA_CAP_ENV = "ATEN_CPU_CAPABILITY"
# Every variable that caps a library's vector width: PyTorch's, oneDNN's convolutions, fasthvae's
# kernels, MKL's.
ISA_CAP_ENVS = (ISA_CAP_ENV, "ONEDNN_MAX_CPU_ISA", "FASTHVAE_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# The flags each cap leaves out, by prefix ("avx" also covers avx2 and avx512*).
_ABOVE_CAP = {"avx2": ("avx512", "amx"), "default": ("avx", "fma", "f16c", "amx")}


def usable_cpu_flags(flags: set[str] | None = None, cap: str | None = None) -> set[str]:
    """``flags`` (default: this CPU's) less those above PyTorch's ISA cap (``cap``, default
    $ATEN_CPU_CAPABILITY): what this process computes with. Mixed precision, the speed probe's cache
    and the figures' machine line go by these."""
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get(ISA_CAP_ENV, "") if cap is None else cap
    above = _ABOVE_CAP.get(cap.lower(), ())
    return {f for f in flags if not f.startswith(above)} if above else set(flags)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine() or "unknown"


def simd_level(flags: set[str]) -> str:
    """The widest x86 vector level these CPU flags give, as figures differ by it: "AVX-512 + bf16",
    "AVX-512", "AVX2", or "" (none of them, or not x86)."""
    if "avx512f" in flags:
        return "AVX-512 + bf16" if flags & {"avx512_bf16", "amx_bf16"} else "AVX-512"
    return "AVX2" if "avx2" in flags else ""


def machine() -> str:
    """One line naming the CPU, its SIMD level (under a cap the capped one, every cap set, and the
    CPU's), the threads torch uses, the GPU and torch: what a figure ran on."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    flags = cpu_flags()
    simd = simd_level(usable_cpu_flags(flags))
    if simd != simd_level(flags):
        caps = ", ".join(f"{name}={os.environ[name]}" for name in ISA_CAP_ENVS if os.environ.get(name))
        simd = f"{simd or 'no SIMD'} by {caps} on an {simd_level(flags)} CPU"
    cpu = f"{cpu_name()} ({simd + ', ' if simd else ''}{torch.get_num_threads()} threads)"
    return f"{cpu}{gpu}; torch {torch.__version__}"
