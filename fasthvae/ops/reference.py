"""Plain-PyTorch reference implementations of every fused op: the Gaussian ops, the discretized
logistic likelihoods and the multi-tensor bookkeeping (torch's foreach ops).

They are the ground truth of the tests, the eager baseline of the benchmarks, and the kernels the
custom ops fall back to (float64 inputs, devices without a fused backend). Arithmetic runs in
float32 (float64 for float64 inputs); elementwise results come back in the input dtype and
reductions in float32 (float64 for float64 inputs).

``*_backward`` functions are the hand-written gradients the fused kernels implement, in PyTorch.
"""

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "sample", "sum", "mean", "batchmean")
# What the kernels write for the KL, in every backend (csrc/gaussian_ops.h takes the same ints):
# nothing, elementwise in the input dtype, or float32 sums per row.
KL_NONE, KL_ELEMENTWISE, KL_ROWS = 0, 1, 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def num_rows(t: torch.Tensor) -> int:
    """Rows are the first dim (1 for a 0-dim tensor); reductions to "sample" sum within rows."""
    return t.shape[0] if t.dim() > 0 else 1


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first: shape [rows]."""
    rows = num_rows(t)
    return t.reshape(rows, t.numel() // rows if rows else 0).sum(1)


def reduce(kl: torch.Tensor, reduction: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Reduce an elementwise KL (compute dtype) as ``reduction`` says."""
    check_reduction(reduction)
    if reduction == "none":
        return kl.to(out_dtype)
    rows = num_rows(kl)
    if reduction == "sample":
        return row_sums(kl)
    total = kl.sum()
    if reduction == "mean":
        return total / max(kl.numel(), 1)
    if reduction == "batchmean":
        return total / max(rows, 1)
    return total


def kl_elementwise(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None = None,
    logvar_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), or to N(0, 1) without a prior."""
    ct = compute_dtype(mu.dtype)
    mu, logvar = mu.to(ct), logvar.to(ct)
    if mu_p is None:
        return 0.5 * (mu * mu + (torch.expm1(logvar) - logvar))
    mu_p, logvar_p = mu_p.to(ct), logvar_p.to(ct)
    d = mu - mu_p
    dl = logvar - logvar_p
    return 0.5 * ((torch.expm1(dl) - dl) + d * d * torch.exp(-logvar_p))


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None = None,
    logvar_p: torch.Tensor | None = None,
    reduction: str = "sample",
) -> torch.Tensor:
    """KL divergence of diagonal Gaussians, reduced."""
    return reduce(kl_elementwise(mu, logvar, mu_p, logvar_p), reduction, mu.dtype)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, in the compute dtype, returned in mu's dtype."""
    ct = compute_dtype(mu.dtype)
    z = mu.to(ct) + torch.exp(0.5 * logvar.to(ct)) * eps.to(ct)
    return z.to(mu.dtype)


def sample_and_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    mu_p: torch.Tensor | None = None,
    logvar_p: torch.Tensor | None = None,
    reduction: str = "sample",
) -> tuple[torch.Tensor, torch.Tensor]:
    return reparameterize(mu, logvar, eps), gaussian_kl(mu, logvar, mu_p, logvar_p, reduction)


def kl_grad_rows(grad: torch.Tensor, reduction: str, rows: int, numel: int) -> torch.Tensor:
    """The upstream gradient of a reduced KL as one float32 value per row."""
    grad = grad.to(torch.float32)
    if reduction == "sample":
        return grad.reshape(rows).contiguous()
    scale = {"sum": 1.0, "mean": 1.0 / max(numel, 1), "batchmean": 1.0 / max(rows, 1)}[reduction]
    return (grad * scale).reshape(1).expand(rows).contiguous()


def gaussian_backward(
    mu: torch.Tensor | None,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    eps: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    grad_kl_rows: bool,
) -> list[torch.Tensor]:
    """Hand-written gradients of sum(grad_z * z) + sum(grad_kl * kl): [dmu, dlogvar(, dmu_p, dlogvar_p)].

    ``grad_kl`` is elementwise, or one value per row when ``grad_kl_rows``.
    """
    ct = compute_dtype(logvar.dtype)
    shape = logvar.shape
    lv = logvar.to(ct)
    dmu = torch.zeros(shape, dtype=ct, device=logvar.device)
    dlv = torch.zeros_like(dmu)
    grads = []
    if grad_kl is not None:
        g = grad_kl.to(ct)
        if grad_kl_rows:
            g = g.reshape((-1,) + (1,) * (len(shape) - 1)) if shape else g.reshape(())
        m = mu.to(ct)
        if mu_p is None:
            dmu = dmu + g * m
            dlv = dlv + 0.5 * g * torch.expm1(lv)
        else:
            d = m - mu_p.to(ct)
            inv_var_p = torch.exp(-logvar_p.to(ct))
            ratio_m1 = torch.expm1(lv - logvar_p.to(ct))
            dmu = dmu + g * d * inv_var_p
            dlv = dlv + 0.5 * g * ratio_m1
            grads = [-(g * d * inv_var_p), -0.5 * g * (ratio_m1 + d * d * inv_var_p)]
    if grad_z is not None:
        gz = grad_z.to(ct)
        dmu = dmu + gz
        dlv = dlv + 0.5 * gz * torch.exp(0.5 * lv) * eps.to(ct)
    out = [dmu, dlv, *grads]
    if mu_p is not None and not grads:
        out += [torch.zeros_like(dmu), torch.zeros_like(dmu)]
    return [t.expand(shape).to(logvar.dtype).contiguous() for t in out]


# ---- discretized logistic likelihoods -------------------------------------------------------

MIN_LOG_SCALE = -7.0
MIXTURE_BLOCKS = 10  # params per mixture component: logit, 3 means, 3 log-scales, 3 coefficients


def logistic_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log P(x) per element for x in {0, 1/255, ..., 1}, mean in [-1, 1] space, 256 bins (edge
    bins open), log-scale clamped below at -7; where a bin's mass is <= 1e-5, the log density at
    its centre (PixelCNN++). In the compute dtype."""
    ct = compute_dtype(mean.dtype)
    x, mean, log_scale = x.to(ct) * 2 - 1, mean.to(ct), log_scale.to(ct)  # bin half-width 1/255
    # The clamp with a zero gradient at -7 itself, as the kernels': written out, not left to the
    # subgradient torch.clamp takes at its bound.
    log_scale = torch.where(log_scale > MIN_LOG_SCALE, log_scale, MIN_LOG_SCALE)
    centered = x - mean
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (centered + 1 / 255)
    minus = inv_s * (centered - 1 / 255)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus), for the x = 0 bin
    log_one_minus_cdf_minus = -F.softplus(minus)  # log (1 - sigmoid(minus)), for the x = 255 bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = minus + 1 / 255 * inv_s  # the bin centre, for the density approximation when delta is tiny
    log_pdf_mid = mid - log_scale - 2 * F.softplus(mid) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_mid))
    return -log_p


def split_mixture(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixture parameters [B, 10K, H, W] -> (logits [B, K, H, W], means, log-scales and channel
    coefficients, each [B, 3, K, H, W]); coefficients in (-1, 1) by tanh."""
    b, c, h, w = params.shape
    k = c // MIXTURE_BLOCKS
    logits = params[:, :k]
    means, log_scales, coeffs = params[:, k:].reshape(b, 3, 3, k, h, w).unbind(1)
    return logits, means, log_scales, torch.tanh(coeffs)


def mixture_nll(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """-log P(x) per pixel [B, H, W] of the discretized logistic mixture (PixelCNN++), x [B, 3, H, W]
    in {0, 1/255, ..., 1}: green's mean moves with red, blue's with red and green. Compute dtype."""
    params = params.to(compute_dtype(params.dtype))
    x = x.to(params.dtype)
    logits, means, log_scales, coeffs = split_mixture(params)
    x2 = (x * 2 - 1).unsqueeze(2)  # [B, 3, 1, H, W]
    red, green = x2[:, 0], x2[:, 1]
    m_r, m_g, m_b = means.unbind(1)
    a, b, c = coeffs.unbind(1)
    mean = torch.stack([m_r, m_g + a * red, m_b + b * red + c * green], 1)
    log_p_channels = -logistic_nll(x.unsqueeze(2), mean, log_scales).sum(1)  # [B, K, H, W]
    return -torch.logsumexp(log_p_channels + F.log_softmax(logits, 1), 1)


def multi_tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm, float32 [n]."""
    if not tensors:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(tensors)).float()


def multi_tensor_scale_(tensors: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Each tensor *= factor, in place."""
    torch._foreach_mul_(tensors, factor)


def multi_tensor_ema_(averages: list[torch.Tensor], values: list[torch.Tensor], weight: torch.Tensor) -> None:
    """averages += (values - averages) * weight, in place (each step rounded to the tensors' dtype)."""
    deltas = torch._foreach_sub(values, averages)
    torch._foreach_mul_(deltas, weight)
    torch._foreach_add_(averages, deltas)


def multi_tensor_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One AdamW step (decoupled weight decay) of every parameter, in place, as torch's single-tensor
    AdamW computes it; nothing changes where ``found_inf`` is nonzero."""
    if found_inf is not None and found_inf.item() != 0:
        return
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step += 1
        t = step.item()
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
