"""Triton kernels of the fused Gaussian ops: one forward and one backward kernel.

A program handles a tile of BLOCK_R rows x BLOCK_C columns (the first dim is the row): narrow rows
share a program (a 128-wide latent fills a tile of 8 rows), wide rows span several programs. Row sums
are written as one partial per row and program, and summed afterwards only when a row spans several
programs, so reductions are deterministic. Noise of element ``i`` (flat index) is output ``i % 4``
of ``tl.randn4x(seed, i // 4)``, the stream every backend shares. The kernels read the seed from a
one-element int64 tensor on the inputs' device: no host value in the launch, so a CUDA graph that
captured it replays fresh noise with each new seed. Arithmetic is float32.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, randint4x, uint_to_uniform_float

from fasthvae.ops.reference import KL_ELEMENTWISE, KL_ROWS

TILE = 1024  # elements per program
NUM_WARPS = 8  # four elements, one Philox call, per thread
MAX_REGISTERS = 64  # per thread: half of an SM's warps resident at least, and no spills (ptxas -v)


def tile_shape(inner: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of a program for rows of ``inner`` elements: whole rows up to TILE wide
    (at least 4 columns, one noise group), TILE columns of one row beyond."""
    block_c = min(max(triton.next_power_of_2(max(inner, 1)), 4), TILE)
    return TILE // block_c, block_c


def launch_tile(inner: int, sample: bool) -> dict[str, object]:
    """The tile constants of a launch on rows of ``inner`` elements (``sample``: it draws noise):
    BLOCK_R, BLOCK_C and ALIGNED (noise in whole groups of four: every row starts at one)."""
    block_r, block_c = tile_shape(inner)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "ALIGNED": sample and inner % 4 == 0}


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
def _noise(seed, starts, offs, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Noise of a tile with flat indices offs = starts + arange(BLOCK_C) (one start per row):
    output offs % 4 of randn4x(seed, offs // 4).

    ALIGNED (every start a multiple of 4): one randn4x call per four elements, interleaved.
    Otherwise every element draws its own Philox group and keeps one Box-Muller pair of it (same
    values as randn4x, which transforms the pairs (u0, u1) and (u2, u3)).
    """
    if ALIGNED:
        groups = starts // 4 + tl.arange(0, BLOCK_C // 4)[None, :]
        n0, n1, n2, n3 = tl.randn4x(seed, groups)
        return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
    else:
        r0, r1, r2, r3 = randint4x(seed, offs // 4)
        lane = offs % 4
        first_pair = lane < 2
        u_radius = uint_to_uniform_float(tl.where(first_pair, r0, r2))
        u_angle = uint_to_uniform_float(tl.where(first_pair, r1, r3))
        n_cos, n_sin = pair_uniform_to_normal(u_radius, u_angle)
        return tl.where(lane % 2 == 0, n_cos, n_sin)


@triton.jit
def _tile(pid, rows, inner, col_blocks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program pid's row indices [BLOCK_R], the flat index of each row's first column [BLOCK_R, 1],
    the flat indices [BLOCK_R, BLOCK_C] and their mask."""
    r = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    first_col = (pid % col_blocks) * BLOCK_C
    cols = first_col + tl.arange(0, BLOCK_C)
    starts = r.to(tl.int64)[:, None] * inner + first_col
    offs = starts + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows)[:, None] & (cols < inner)[None, :]
    return r, starts, offs, mask


@triton.jit
def gaussian_forward_kernel(
    mu_ptr, lv_ptr, mup_ptr, lvp_ptr, z_ptr, kl_ptr, seed_ptr, rows, inner, col_blocks,
    SAMPLE: tl.constexpr, KL_MODE: tl.constexpr, PRIOR: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r, starts, offs, mask = _tile(pid, rows, inner, col_blocks, BLOCK_R, BLOCK_C)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE:
        eps = _noise(tl.load(seed_ptr), starts, offs, ALIGNED, BLOCK_C)
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
        else:  # one partial per row and program: kl[row, column block]
            partial = tl.sum(tl.where(mask, kl, 0.0), axis=1)
            tl.store(kl_ptr + r.to(tl.int64) * col_blocks + pid % col_blocks, partial, mask=r < rows)


@triton.jit
def gaussian_backward_kernel(
    mu_ptr, lv_ptr, mup_ptr, lvp_ptr, gz_ptr, gk_ptr, dmu_ptr, dlv_ptr, dmup_ptr, dlvp_ptr,
    seed_ptr, rows, inner, col_blocks,
    SAMPLE: tl.constexpr, KL: tl.constexpr, PRIOR: tl.constexpr, GRAD_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r, starts, offs, mask = _tile(pid, rows, inner, col_blocks, BLOCK_R, BLOCK_C)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE:  # d z / d logvar = exp(logvar / 2) * eps / 2, drawn first: fewer values live in Philox
        dz_dlv = 0.5 * tl.exp(0.5 * lv) * _noise(tl.load(seed_ptr), starts, offs, ALIGNED, BLOCK_C)
    dmu = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    dlv = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    if KL:
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GRAD_ROWS:
            g = tl.load(gk_ptr + r, mask=r < rows, other=0.0).to(tl.float32)[:, None]
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
        dmu += gz
        dlv += gz * dz_dlv
    tl.store(dmu_ptr + offs, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + offs, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


def _device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``x``'s GPU: Triton launches on the current device, which may be another one."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _layout(x: torch.Tensor, sample: bool) -> tuple[int, int, int, int, dict[str, object]]:
    """rows, inner, column blocks per row, programs and tile constants of a launch on ``x``."""
    rows = x.shape[0] if x.dim() > 0 else 1
    inner = x.numel() // rows if rows else 0
    tile = launch_tile(inner, sample)
    col_blocks = triton.cdiv(inner, tile["BLOCK_C"])
    return rows, inner, col_blocks, triton.cdiv(rows, tile["BLOCK_R"]) * col_blocks, tile


def forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    seed: torch.Tensor | None,
    sample: bool,
    kl_mode: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Same contract as the C++ ``forward`` (csrc/gaussian_ops.h); inputs contiguous."""
    rows, inner, col_blocks, programs, tile = _layout(mu, sample)
    z = torch.empty_like(mu) if sample else None
    kl = None
    if kl_mode == KL_ELEMENTWISE:
        kl = torch.empty_like(mu)
    elif kl_mode == KL_ROWS:  # every (row, column block) partial is written when there are elements
        partials = torch.empty if mu.numel() else torch.zeros
        kl = partials(rows, max(col_blocks, 1), dtype=torch.float32, device=mu.device)
    if mu.numel():
        with _device_guard(mu):
            gaussian_forward_kernel[(programs,)](
                mu, logvar, mu_p, logvar_p, z, kl, seed if sample else None, rows, inner, col_blocks,
                SAMPLE=sample, KL_MODE=kl_mode, PRIOR=mu_p is not None, **tile,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
            )  # fmt: skip
    if kl_mode == KL_ROWS:
        kl = kl.sum(1) if kl.shape[1] > 1 else kl.view(rows)
    return z, kl


def backward(
    mu: torch.Tensor | None,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    seed: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    grad_kl_rows: bool,
) -> list[torch.Tensor]:
    """Same contract as the C++ ``backward``: [dmu, dlogvar(, dmu_p, dlogvar_p)]."""
    rows, inner, col_blocks, programs, tile = _layout(logvar, grad_z is not None)
    dmu, dlv = torch.empty_like(logvar), torch.empty_like(logvar)
    prior = mu_p is not None
    dmu_p = torch.empty_like(logvar) if prior else None
    dlv_p = torch.empty_like(logvar) if prior else None
    if logvar.numel():
        with _device_guard(logvar):
            gaussian_backward_kernel[(programs,)](
                mu, logvar, mu_p, logvar_p, grad_z, grad_kl, dmu, dlv, dmu_p, dlv_p,
                seed if grad_z is not None else None, rows, inner, col_blocks,
                SAMPLE=grad_z is not None, KL=grad_kl is not None, PRIOR=prior, GRAD_ROWS=grad_kl_rows,
                **tile, num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS,
            )  # fmt: skip
    return [dmu, dlv] + ([dmu_p, dlv_p] if prior else [])
