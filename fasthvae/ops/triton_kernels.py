"""Triton kernels of the fused Gaussian ops: one forward and one backward kernel.

Each program handles BLOCK elements of one row (the first dim); row sums are written as one
partial per program and summed afterwards, so reductions are deterministic. Noise of element
``i`` (flat index) is output ``i % 4`` of ``tl.randn4x(seed, i // 4)``, the stream every backend
shares. Arithmetic is float32.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

import torch
import triton
import triton.language as tl

from fasthvae.ops.reference import KL_ELEMENTWISE, KL_ROWS

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation: Taylor series near 0, exp(x) - 1 elsewhere."""
    p = x * (
        1.0
        + x
        * (
            0.5
            + x
            * (
                1.0 / 6.0
                + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x / 40320.0))))
            )
        )
    )
    return tl.where(tl.abs(x) < 0.5, p, tl.exp(x) - 1.0)


@triton.jit
def _noise(seed, start, offs, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Noise of the block's elements offs = start + arange: output offs % 4 of randn4x(seed, offs // 4).

    ALIGNED (start is a multiple of 4): one randn4x call per four elements, interleaved.
    Otherwise every element draws its own group and keeps its lane (same values, 4x the work).
    """
    if ALIGNED:
        groups = start // 4 + tl.arange(0, BLOCK // 4)
        n0, n1, n2, n3 = tl.randn4x(seed, groups)
        return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
    else:
        n0, n1, n2, n3 = tl.randn4x(seed, offs // 4)
        lane = offs % 4
        return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))


@triton.jit
def _row_block(pid, inner, blocks_per_row, BLOCK: tl.constexpr):
    """Program pid's row, first flat index, flat indices and mask."""
    row = pid // blocks_per_row
    first_col = (pid % blocks_per_row) * BLOCK
    cols = first_col + tl.arange(0, BLOCK)
    start = row.to(tl.int64) * inner + first_col
    return row, start, start + tl.arange(0, BLOCK), cols < inner


@triton.jit(do_not_specialize=["seed"])
def gaussian_forward_kernel(
    mu_ptr, lv_ptr, mup_ptr, lvp_ptr, z_ptr, kl_ptr, seed, inner, blocks_per_row,
    SAMPLE: tl.constexpr, KL_MODE: tl.constexpr, PRIOR: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    _, start, offs, mask = _row_block(pid, inner, blocks_per_row, BLOCK)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE:
        eps = _noise(seed, start, offs, ALIGNED, BLOCK)
        z = mu + tl.exp(0.5 * lv) * eps
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
    if KL_MODE != 0:  # KL_NONE (jit code reads only constexpr globals)
        if PRIOR:
            mup = tl.load(mup_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            lvp = tl.load(lvp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = mu - mup
            dl = lv - lvp
            kl = 0.5 * ((_expm1(dl) - dl) + d * d * tl.exp(-lvp))
        else:
            kl = 0.5 * (mu * mu + (_expm1(lv) - lv))
        if KL_MODE == 1:  # KL_ELEMENTWISE
            tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(kl_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))


@triton.jit(do_not_specialize=["seed"])
def gaussian_backward_kernel(
    mu_ptr, lv_ptr, mup_ptr, lvp_ptr, gz_ptr, gk_ptr, dmu_ptr, dlv_ptr, dmup_ptr, dlvp_ptr,
    seed, inner, blocks_per_row,
    SAMPLE: tl.constexpr, KL: tl.constexpr, PRIOR: tl.constexpr, GRAD_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row, start, offs, mask = _row_block(pid, inner, blocks_per_row, BLOCK)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dmu = tl.zeros([BLOCK], dtype=tl.float32)
    dlv = tl.zeros([BLOCK], dtype=tl.float32)
    if KL:
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GRAD_ROWS:
            g = tl.load(gk_ptr + row).to(tl.float32)
        else:
            g = tl.load(gk_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PRIOR:
            mup = tl.load(mup_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            lvp = tl.load(lvp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = mu - mup
            inv_var_p = tl.exp(-lvp)
            ratio_m1 = _expm1(lv - lvp)
            dmu = g * d * inv_var_p
            dlv = 0.5 * g * ratio_m1
            tl.store(dmup_ptr + offs, (-dmu).to(dmup_ptr.dtype.element_ty), mask=mask)
            dlvp = -0.5 * g * (ratio_m1 + d * d * inv_var_p)
            tl.store(dlvp_ptr + offs, dlvp.to(dlvp_ptr.dtype.element_ty), mask=mask)
        else:
            dmu = g * mu
            dlv = 0.5 * g * _expm1(lv)
    elif PRIOR:  # no gradient reached the KL: the prior's gradients are zero
        tl.store(dmup_ptr + offs, dmu.to(dmup_ptr.dtype.element_ty), mask=mask)
        tl.store(dlvp_ptr + offs, dlv.to(dlvp_ptr.dtype.element_ty), mask=mask)
    if SAMPLE:
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = _noise(seed, start, offs, ALIGNED, BLOCK)
        dmu += gz
        dlv += 0.5 * gz * tl.exp(0.5 * lv) * eps
    tl.store(dmu_ptr + offs, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + offs, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


def _layout(mu: torch.Tensor) -> tuple[int, int, int]:
    rows = mu.shape[0] if mu.dim() > 0 else 1
    inner = mu.numel() // rows if rows else 0
    return rows, inner, triton.cdiv(inner, BLOCK)


def forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    seed: int,
    sample: bool,
    kl_mode: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Same contract as the C++ ``forward`` (csrc/gaussian_ops.h); inputs contiguous."""
    rows, inner, blocks = _layout(mu)
    z = torch.empty_like(mu) if sample else None
    kl = None
    if kl_mode == KL_ELEMENTWISE:
        kl = torch.empty_like(mu)
    elif kl_mode == KL_ROWS:
        kl = torch.zeros(rows, max(blocks, 1), dtype=torch.float32, device=mu.device)
    if mu.numel():
        gaussian_forward_kernel[(rows * blocks,)](
            mu, logvar, mu_p, logvar_p, z, kl, seed, inner, blocks,
            SAMPLE=sample, KL_MODE=kl_mode, PRIOR=mu_p is not None, ALIGNED=sample and inner % 4 == 0,
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    if kl_mode == KL_ROWS:
        kl = kl.sum(1)
    return z, kl


def backward(
    mu: torch.Tensor | None,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    seed: int,
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    grad_kl_rows: bool,
) -> list[torch.Tensor]:
    """Same contract as the C++ ``backward``: [dmu, dlogvar(, dmu_p, dlogvar_p)]."""
    rows, inner, blocks = _layout(logvar)
    dmu, dlv = torch.empty_like(logvar), torch.empty_like(logvar)
    prior = mu_p is not None
    dmu_p = torch.empty_like(logvar) if prior else None
    dlv_p = torch.empty_like(logvar) if prior else None
    if logvar.numel():
        gaussian_backward_kernel[(rows * blocks,)](
            mu, logvar, mu_p, logvar_p, grad_z, grad_kl, dmu, dlv, dmu_p, dlv_p, seed, inner, blocks,
            SAMPLE=grad_z is not None, KL=grad_kl is not None, PRIOR=prior, GRAD_ROWS=grad_kl_rows,
            ALIGNED=grad_z is not None and inner % 4 == 0, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return [dmu, dlv] + ([dmu_p, dlv_p] if prior else [])
