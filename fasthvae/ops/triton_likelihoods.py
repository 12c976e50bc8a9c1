"""Triton kernels of the discretized-logistic likelihoods: the mixture and the single logistic.

The formulas are csrc/logistic_math.h's (the bin mass as sigmoid(plus) sigmoid(-minus) (1 - e^-w),
the density stand-in below a mass of 1e-5, the log-scale clamped at -7, exponent arguments floored
at -87); the CPU loops also trade two exps and two logs per channel for products, which these
kernels compute directly. Mixture: a program takes BLOCK pixels (flat over batch, rows, columns;
any strides of the [B, C, H, W] inputs) and walks the K components in a loop: the forward pass
keeps running logsumexps and writes each pixel's -log P(x) and the logsumexp of its logits
(float32); the backward pass recomputes each component from the inputs and those two values and
writes the parameters' gradient. The single logistic is elementwise over contiguous tensors.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
"""

import torch
import triton
import triton.language as tl

from fasthvae.ops.triton_kernels import _device_guard, _expm1

BLOCK_PIXELS = 128  # pixels per program of the mixture kernels (one per thread)
BLOCK_ELEMENTS = 256  # elements per program of the single-logistic kernels (two per thread)
NUM_WARPS = 4
# csrc/logistic_math.h's constants (constexpr: the kernels may read them)
MIN_LOG_SCALE = tl.constexpr(-7.0)
HALF_BIN = tl.constexpr(1.0 / 255.0)
EDGE = tl.constexpr(0.999)
LOG_MIN_MASS = tl.constexpr(-11.512925465)  # log(1e-5)
LOG_HALF_BINS = tl.constexpr(4.8481164632)  # log(127.5)
EXP_FLOOR = tl.constexpr(-87.0)


@triton.jit
def _exp_floored(t):
    """e^max(t, -87): the CPU loops' floor, so every backend computes the same."""
    return tl.exp(tl.maximum(t, EXP_FLOOR))


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], accurate near 0."""
    return tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))


@triton.jit
def _sigmoids(t):
    """sigmoid(t), sigmoid(-t) and log(1 + e^-|t|)."""
    e = _exp_floored(-tl.abs(t))
    r = 1.0 / (1.0 + e)
    positive = t >= 0.0
    return tl.where(positive, r, e * r), tl.where(positive, e * r, r), _log1p_unit(e)


@triton.jit
def _tanh(r):
    """tanh(r) = sign(r) (1 - e^-2|r|) / (1 + e^-2|r|), without cancellation near 0."""
    a = tl.abs(r)
    t = -_expm1(-2.0 * a) / (1.0 + tl.exp(-2.0 * a))
    return tl.where(r < 0.0, -t, t)


@triton.jit
def _logistic_log_prob(x, mean, log_scale):
    """log P(x) of the discretized logistic, x and mean in [-1, 1] space; and its gradient in the
    mean and the log-scale (zero at the clamp and below, as torch.clamp's)."""
    ls = tl.maximum(log_scale, MIN_LOG_SCALE)
    inv = tl.exp(-ls)
    centered = x - mean
    plus = inv * (centered + HALF_BIN)
    minus = inv * (centered - HALF_BIN)
    mid = inv * centered
    _, sp_neg, sp_log1p = _sigmoids(plus)
    sm_pos, _, sm_log1p = _sigmoids(minus)
    sd_pos, _, sd_log1p = _sigmoids(mid)
    log_cdf_plus = -(tl.maximum(-plus, 0.0) + sp_log1p)
    log_sf_minus = -(tl.maximum(minus, 0.0) + sm_log1p)
    # The bin's width in standardized units; the tensor comes first: the interpreter keeps a
    # product with a constexpr on its left a constexpr.
    w = inv * (2.0 * HALF_BIN)
    neg_expm1_w = -_expm1(-w)
    log_mass = log_cdf_plus + log_sf_minus + tl.log(neg_expm1_w)
    log_density = mid - ls - 2.0 * (tl.maximum(mid, 0.0) + sd_log1p) - LOG_HALF_BINS
    w_over_expm1_w = w * (1.0 - neg_expm1_w) / neg_expm1_w
    g_mid = 1.0 - 2.0 * sd_pos
    low = x < -EDGE
    high = x > EDGE
    inside = log_mass > LOG_MIN_MASS
    logp = tl.where(low, log_cdf_plus, tl.where(high, log_sf_minus, tl.where(inside, log_mass, log_density)))
    gm_inside = tl.where(inside, -inv * (sp_neg - sm_pos), -inv * g_mid)
    gm = tl.where(low, -inv * sp_neg, tl.where(high, inv * sm_pos, gm_inside))
    gl_inside = tl.where(inside, -plus * sp_neg + minus * sm_pos - w_over_expm1_w, -mid * g_mid - 1.0)
    gl = tl.where(low, -plus * sp_neg, tl.where(high, minus * sm_pos, gl_inside))
    return logp, gm, tl.where(log_scale <= MIN_LOG_SCALE, 0.0, gl)


@triton.jit
def _pixel_offsets(pixels, hw, width, stride_b, stride_h, stride_w):
    b = pixels // hw
    r = pixels % hw
    return b * stride_b + (r // width) * stride_h + (r % width) * stride_w


@triton.jit
def _component(p_ptr, p_off, sc, k, K, x0, x1, x2, mask):
    """Component k's three channel log-probabilities summed, their gradients in the channel means
    and log-scales, and the tanh'd coefficients (the parameter blocks of mixture_ops.h)."""
    m0 = tl.load(p_ptr + p_off + (K + k) * sc, mask=mask, other=0.0).to(tl.float32)
    m1 = tl.load(p_ptr + p_off + (2 * K + k) * sc, mask=mask, other=0.0).to(tl.float32)
    m2 = tl.load(p_ptr + p_off + (3 * K + k) * sc, mask=mask, other=0.0).to(tl.float32)
    s0 = tl.load(p_ptr + p_off + (4 * K + k) * sc, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(p_ptr + p_off + (5 * K + k) * sc, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(p_ptr + p_off + (6 * K + k) * sc, mask=mask, other=0.0).to(tl.float32)
    a = _tanh(tl.load(p_ptr + p_off + (7 * K + k) * sc, mask=mask, other=0.0).to(tl.float32))
    b = _tanh(tl.load(p_ptr + p_off + (8 * K + k) * sc, mask=mask, other=0.0).to(tl.float32))
    c = _tanh(tl.load(p_ptr + p_off + (9 * K + k) * sc, mask=mask, other=0.0).to(tl.float32))
    l0, gm0, gs0 = _logistic_log_prob(x0, m0, s0)
    l1, gm1, gs1 = _logistic_log_prob(x1, m1 + a * x0, s1)
    l2, gm2, gs2 = _logistic_log_prob(x2, m2 + b * x0 + c * x1, s2)
    return l0 + l1 + l2, gm0, gm1, gm2, gs0, gs1, gs2, a, b, c


@triton.jit
def _load_x(x_ptr, x_off, xsc, mask):
    x0 = tl.load(x_ptr + x_off, mask=mask, other=0.0) * 2.0 - 1.0
    x1 = tl.load(x_ptr + x_off + xsc, mask=mask, other=0.0) * 2.0 - 1.0
    x2 = tl.load(x_ptr + x_off + 2 * xsc, mask=mask, other=0.0) * 2.0 - 1.0
    return x0, x1, x2


@triton.jit
def _pixel_block(x_ptr, pixels, hw, width, xsb, xsc, xsh, xsw, psb, psh, psw, BLOCK: tl.constexpr):
    """Program's pixels (flat indices), their mask, x's channels in [-1, 1] space and the offsets of
    the pixels' parameters."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = q < pixels
    x0, x1, x2 = _load_x(x_ptr, _pixel_offsets(q, hw, width, xsb, xsh, xsw), xsc, mask)
    return q, mask, x0, x1, x2, _pixel_offsets(q, hw, width, psb, psh, psw)


@triton.jit
def mixture_forward_kernel(
    x_ptr, p_ptr, nll_ptr, lse_ptr, pixels, hw, width, K,
    xsb, xsc, xsh, xsw, psb, psc, psh, psw,
    BLOCK: tl.constexpr,
):  # fmt: skip
    block = _pixel_block(x_ptr, pixels, hw, width, xsb, xsc, xsh, xsw, psb, psh, psw, BLOCK)
    q, mask, x0, x1, x2, p_off = block
    top_j = tl.full([BLOCK], -1.0e30, tl.float32)
    top_l = tl.full([BLOCK], -1.0e30, tl.float32)
    sum_j = tl.zeros([BLOCK], tl.float32)
    sum_l = tl.zeros([BLOCK], tl.float32)
    for k in range(K):
        logit = tl.load(p_ptr + p_off + k * psc, mask=mask, other=0.0).to(tl.float32)
        logp, _, _, _, _, _, _, _, _, _ = _component(p_ptr, p_off, psc, k, K, x0, x1, x2, mask)
        joint = logit + logp
        new_j = tl.maximum(top_j, joint)
        new_l = tl.maximum(top_l, logit)
        sum_j = sum_j * _exp_floored(top_j - new_j) + _exp_floored(joint - new_j)
        sum_l = sum_l * _exp_floored(top_l - new_l) + _exp_floored(logit - new_l)
        top_j = new_j
        top_l = new_l
    lse_l = top_l + tl.log(sum_l)
    tl.store(lse_ptr + q, lse_l, mask=mask)
    tl.store(nll_ptr + q, lse_l - (top_j + tl.log(sum_j)), mask=mask)


@triton.jit
def mixture_backward_kernel(
    x_ptr, p_ptr, nll_ptr, lse_ptr, g_ptr, d_ptr, pixels, hw, width, K,
    xsb, xsc, xsh, xsw, psb, psc, psh, psw, dsb, dsc, dsh, dsw,
    BLOCK: tl.constexpr,
):  # fmt: skip
    block = _pixel_block(x_ptr, pixels, hw, width, xsb, xsc, xsh, xsw, psb, psh, psw, BLOCK)
    q, mask, x0, x1, x2, p_off = block
    d_off = _pixel_offsets(q, hw, width, dsb, dsh, dsw)
    lse_l = tl.load(lse_ptr + q, mask=mask, other=0.0)
    lse_j = lse_l - tl.load(nll_ptr + q, mask=mask, other=0.0)
    g = tl.load(g_ptr + q, mask=mask, other=0.0)
    out = d_ptr.dtype.element_ty
    for k in range(K):
        logit = tl.load(p_ptr + p_off + k * psc, mask=mask, other=0.0).to(tl.float32)
        logp, gm0, gm1, gm2, gs0, gs1, gs2, a, b, c = _component(p_ptr, p_off, psc, k, K, x0, x1, x2, mask)
        posterior = _exp_floored(logit + logp - lse_j)
        prior = _exp_floored(logit - lse_l)
        g_logp = -g * posterior
        g0 = g_logp * gm0
        g1 = g_logp * gm1
        g2 = g_logp * gm2
        tl.store(d_ptr + d_off + k * dsc, (g * (prior - posterior)).to(out), mask=mask)
        tl.store(d_ptr + d_off + (K + k) * dsc, g0.to(out), mask=mask)
        tl.store(d_ptr + d_off + (2 * K + k) * dsc, g1.to(out), mask=mask)
        tl.store(d_ptr + d_off + (3 * K + k) * dsc, g2.to(out), mask=mask)
        tl.store(d_ptr + d_off + (4 * K + k) * dsc, (g_logp * gs0).to(out), mask=mask)
        tl.store(d_ptr + d_off + (5 * K + k) * dsc, (g_logp * gs1).to(out), mask=mask)
        tl.store(d_ptr + d_off + (6 * K + k) * dsc, (g_logp * gs2).to(out), mask=mask)
        tl.store(d_ptr + d_off + (7 * K + k) * dsc, (g1 * x0 * (1.0 - a * a)).to(out), mask=mask)
        tl.store(d_ptr + d_off + (8 * K + k) * dsc, (g2 * x0 * (1.0 - b * b)).to(out), mask=mask)
        tl.store(d_ptr + d_off + (9 * K + k) * dsc, (g2 * x1 * (1.0 - c * c)).to(out), mask=mask)


@triton.jit
def logistic_forward_kernel(x_ptr, mean_ptr, ls_ptr, nll_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0) * 2.0 - 1.0
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ls = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logp, _, _ = _logistic_log_prob(x, mean, ls)
    tl.store(nll_ptr + offs, (-logp).to(nll_ptr.dtype.element_ty), mask=mask)


@triton.jit
def logistic_backward_kernel(x_ptr, mean_ptr, ls_ptr, g_ptr, dm_ptr, dl_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0) * 2.0 - 1.0
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ls = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, gm, gl = _logistic_log_prob(x, mean, ls)
    tl.store(dm_ptr + offs, (-g * gm).to(dm_ptr.dtype.element_ty), mask=mask)
    tl.store(dl_ptr + offs, (-g * gl).to(dl_ptr.dtype.element_ty), mask=mask)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def mixture_forward(x: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
    """Same contract as the C++ ``mixture_forward`` (csrc/mixture_ops.h): [nll, lse_logits]."""
    b, rows, h, w = params.shape
    nll = params.new_empty((b, h, w), dtype=torch.float32)
    lse = torch.empty_like(nll)
    if nll.numel():
        with _device_guard(params):
            mixture_forward_kernel[(triton.cdiv(nll.numel(), BLOCK_PIXELS),)](
                x, params, nll, lse, nll.numel(), h * w, w, rows // 10,
                *_strides(x), *_strides(params), BLOCK=BLOCK_PIXELS, num_warps=NUM_WARPS,
            )  # fmt: skip
    return [nll, lse]


def mixture_backward(
    x: torch.Tensor, params: torch.Tensor, nll: torch.Tensor, lse_logits: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Same contract as the C++ ``mixture_backward``: the gradient in params (empty_like(params))."""
    d_params = torch.empty_like(params)
    if nll.numel():
        _, rows, h, w = params.shape
        with _device_guard(params):
            mixture_backward_kernel[(triton.cdiv(nll.numel(), BLOCK_PIXELS),)](
                x, params, nll, lse_logits, grad, d_params, nll.numel(), h * w, w, rows // 10,
                *_strides(x), *_strides(params), *_strides(d_params), BLOCK=BLOCK_PIXELS, num_warps=NUM_WARPS,
            )  # fmt: skip
    return d_params


def logistic_forward(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Same contract as the C++ ``logistic_forward``: nll elementwise, in mean's dtype."""
    nll = torch.empty_like(mean)
    if nll.numel():
        with _device_guard(mean):
            logistic_forward_kernel[(triton.cdiv(nll.numel(), BLOCK_ELEMENTS),)](
                x, mean, log_scale, nll, nll.numel(), BLOCK=BLOCK_ELEMENTS, num_warps=NUM_WARPS
            )
    return nll


def logistic_backward(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, grad: torch.Tensor
) -> list[torch.Tensor]:
    """Same contract as the C++ ``logistic_backward``: [d_mean, d_log_scale]."""
    d_mean, d_ls = torch.empty_like(mean), torch.empty_like(mean)
    if mean.numel():
        with _device_guard(mean):
            logistic_backward_kernel[(triton.cdiv(mean.numel(), BLOCK_ELEMENTS),)](
                x,
                mean,
                log_scale,
                grad,
                d_mean,
                d_ls,
                mean.numel(),
                BLOCK=BLOCK_ELEMENTS,
                num_warps=NUM_WARPS,
            )
    return [d_mean, d_ls]
