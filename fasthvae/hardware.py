"""What this machine is: the CPU's name and feature flags, its SIMD level, and one line naming CPU,
threads, GPU and torch (what a figure ran on, and what a cached speed choice is keyed by)."""

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
    """One line naming the CPU, its SIMD level, the threads torch uses, the GPU and torch: what a
    figure ran on."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    simd = simd_level(cpu_flags())
    cpu = f"{cpu_name()} ({simd + ', ' if simd else ''}{torch.get_num_threads()} threads)"
    return f"{cpu}{gpu}; torch {torch.__version__}"
