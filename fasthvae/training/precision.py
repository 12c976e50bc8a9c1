"""Mixed precision: autocast dtype selection and the matching GradScaler.

On a CPU, autocast to bf16 or fp16 pays only where the CPU computes in that type natively (AVX-512
BF16 / AMX for bf16, AVX-512 FP16 / AMX-FP16 for fp16, the Arm bf16 / fp16 extensions); elsewhere
PyTorch emulates it and a step is many times slower than fp32. There ``--amp`` trains in fp32 and
says so.
"""

import contextlib
import os
import platform
import warnings

import torch

from fasthvae.hardware import ISA_CAP_ENV, usable_cpu_flags

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native arithmetic in each type.
NATIVE_CPU_FLAGS = {
    torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},
    torch.float16: {"avx512_fp16", "amx_fp16", "fphp"},
}


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def cpu_amp_fallback(dtype: torch.dtype, flags: set[str]) -> str | None:
    """Why autocast to ``dtype`` should not run on a CPU with these ``flags``; None if it may."""
    if NATIVE_CPU_FLAGS[dtype] & flags:
        return None
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    cap = f", {ISA_CAP_ENV}={os.environ[ISA_CAP_ENV]}" if os.environ.get(ISA_CAP_ENV) else ""
    return (
        f"this CPU ({platform.machine()}{cap}) has no native {name} arithmetic "
        f"(none of {', '.join(sorted(NATIVE_CPU_FLAGS[dtype]))}); --amp would be many times slower "
        "than fp32, so it trains in fp32"
    )


def choose_amp_dtype(
    amp: bool, requested: str, device: torch.device, flags: set[str] | None = None
) -> tuple[torch.dtype | None, str | None]:
    """(autocast dtype or None, why AMP was turned off or None).

    bf16 unless fp16 is asked for or the GPU has no bf16; on a CPU, None (fp32) with a warning when
    the CPU lacks native arithmetic in that type (``flags``: default this machine's, less those above
    any ISA cap).
    """
    if not amp:
        return None, None
    if requested not in AMP_DTYPES:
        raise ValueError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {requested!r}")
    dtype = AMP_DTYPES[requested]
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16, None
        return dtype, None
    reason = cpu_amp_fallback(dtype, usable_cpu_flags() if flags is None else flags)
    if reason is not None:
        warnings.warn(f"--amp: {reason}", stacklevel=2)
        return None, reason
    return dtype, None


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
