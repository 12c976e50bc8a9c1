"""Philox-4x32-10 normal noise in plain PyTorch, bit-compatible with Triton's ``tl.randn4x``.

The fused kernels (Triton, CUDA C++, CPU C++) all draw element ``i`` of a sampling call as output
``i % 4`` of ``tl.randn4x(seed, i // 4)``: one Philox call and two Box-Muller pairs (cosine and sine
branches) per four elements. This module computes the same numbers with int64 tensor arithmetic,
so the reference path and the tests can reproduce any kernel's noise exactly (up to the last ulp
of log/cos/sin).
"""

import torch

_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of a uint32 constant and uint32 values (int64)."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi << 16) + p_lo) & _MASK32
    return hi, lo


def philox_uint32(seed: int | torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four Philox outputs for counters (offset_lo, offset_hi, 0, 0) and key seed (int64 tensors):
    Triton's ``tl.randint4x(seed, offsets)``. ``seed``: a Python int or a one-element int64 tensor
    (read where it lies: no device-to-host copy), its 64 bits taken as unsigned."""
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=offsets.device, dtype=torch.int64)
        k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32  # the shift is arithmetic: mask the sign away
    else:
        seed &= (1 << 64) - 1
        k0, k1 = seed & _MASK32, seed >> 32
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _pair_to_normal(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller of two uint32 draws, cosine and sine branches: Triton's ``pair_uniform_to_normal``."""
    r = torch.sqrt(-2.0 * torch.log(torch.clamp_min(_uint_to_uniform(a), 1.0e-7)))
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * _uint_to_uniform(b)
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_randn_at(seed: int | torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 noise of elements ``offsets``: output i % 4 of ``randn4x(seed, i // 4)``."""
    offsets = offsets.to(torch.int64)
    c0, c1, c2, c3 = philox_uint32(seed, offsets >> 2)
    lane = offsets & 3
    first_pair = lane < 2
    n_cos, n_sin = _pair_to_normal(torch.where(first_pair, c0, c2), torch.where(first_pair, c1, c3))
    return torch.where(lane % 2 == 1, n_sin, n_cos)


def philox_randn(seed: int | torch.Tensor, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 noise of elements ``0 .. numel - 1`` (see :func:`philox_randn_at`).

    Draws whole groups: one Philox call and both Box-Muller branches per four elements.
    """
    groups = torch.arange((numel + 3) // 4, device=device, dtype=torch.int64)
    c0, c1, c2, c3 = philox_uint32(seed, groups)
    return torch.stack([*_pair_to_normal(c0, c1), *_pair_to_normal(c2, c3)], dim=1).flatten()[:numel]
