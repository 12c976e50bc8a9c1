"""Mixed precision: autocast dtype selection and the matching GradScaler."""

import contextlib

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def choose_amp_dtype(amp: bool, requested: str, device: torch.device) -> torch.dtype | None:
    """bf16 unless fp16 is asked for or the GPU has no bf16; None without ``--amp``."""
    if not amp:
        return None
    if requested not in AMP_DTYPES:
        raise ValueError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {requested!r}")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return AMP_DTYPES[requested]


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
