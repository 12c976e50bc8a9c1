"""Fused Gaussian ops: reparameterized sampling and diagonal-Gaussian KL, forward and backward.

>>> from fasthvae.ops import reparameterize, gaussian_kl, sample_and_kl
>>> z = reparameterize(mu, logvar)                     # mu + exp(logvar / 2) * eps
>>> kl = gaussian_kl(mu, logvar)                       # KL(N(mu, e^logvar) || N(0, I)), per sample
>>> kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)   # KL(q || p)
>>> z, kl = sample_and_kl(mu, logvar, mu_p, logvar_p)  # both in one pass

A GELU that keeps its derivative for the backward (``gelu``, :mod:`fasthvae.ops.activation`), the
discretized logistic likelihoods (``mixture_nll``, ``logistic_nll``) and the multi-tensor
bookkeeping of an optimizer step (``multi_tensor_norms``, ``multi_tensor_scale_``,
``multi_tensor_ema_``, ``multi_tensor_adamw_``, :mod:`fasthvae.ops.multi_tensor`) and a stride-1
convolution's weight and bias gradients (``conv2d_weight_grad``, ``conv1x1_weight_grad``,
:mod:`fasthvae.ops.weight_grad`) are here too.

Reductions: ``none`` (elementwise, input dtype), ``sample`` (sum over all dims but the first,
shape [B]), ``sum``, ``mean``, ``batchmean`` (sum / B); reduced results are float32 (float64 for
float64 inputs). Arithmetic is float32 for float32/float16/bfloat16 inputs. Shapes broadcast.
The backend is chosen per device (see :mod:`fasthvae.ops.backend`).
"""

import torch
from torch import Tensor

from fasthvae.ops import backend, library, library_likelihoods, reference
from fasthvae.ops.activation import gelu
from fasthvae.ops.backend import (
    BACKENDS,
    cpu_isa,
    cpu_isas,
    get_backend,
    set_backend,
    set_cpu_isa,
    use_backend,
    use_cpu_isa,
)
from fasthvae.ops.multi_tensor import (
    multi_tensor_adamw_,
    multi_tensor_ema_,
    multi_tensor_norms,
    multi_tensor_scale_,
)
from fasthvae.ops.reference import REDUCTIONS
from fasthvae.ops.weight_grad import conv1x1_weight_grad, conv2d_weight_grad

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "conv1x1_weight_grad",
    "conv2d_weight_grad",
    "cpu_isa",
    "cpu_isas",
    "gaussian_kl",
    "gelu",
    "get_backend",
    "logistic_nll",
    "mixture_nll",
    "multi_tensor_adamw_",
    "multi_tensor_ema_",
    "multi_tensor_norms",
    "multi_tensor_scale_",
    "reparameterize",
    "sample_and_kl",
    "set_backend",
    "set_cpu_isa",
    "use_backend",
    "use_cpu_isa",
]

_SEED_HIGH = 2**63 - 1


def _check_floating(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _prepare(
    mu: Tensor, logvar: Tensor, mu_p: Tensor | None, logvar_p: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validate the Gaussians' parameters; broadcast them to one shape and one floating dtype."""
    named = {"mu": mu, "logvar": logvar, "mu_p": mu_p, "logvar_p": logvar_p}
    given = {k: v for k, v in named.items() if v is not None}
    for name, t in given.items():
        _check_floating(name, t)
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {', '.join(map(str, devices))}")
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in given.values()))
    except RuntimeError as err:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in given.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from err
    dtype = mu.dtype
    for t in given.values():
        dtype = torch.promote_types(dtype, t.dtype)
    if (mu_p is None) != (logvar_p is None):
        zero = torch.zeros((), dtype=dtype, device=mu.device)
        mu_p = zero if mu_p is None else mu_p
        logvar_p = zero if logvar_p is None else logvar_p

    def fit(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).expand(shape)

    return fit(mu), fit(logvar), fit(mu_p), fit(logvar_p)


def _seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A fresh int64 seed from PyTorch's RNG (``torch.manual_seed`` or ``generator``), drawn on the
    inputs' device for CUDA inputs (no host read in the step: CUDA graphs replay fresh draws) and
    on the CPU otherwise; from ``generator``'s device when one is given."""
    where = generator.device if generator is not None else device
    if where.type != "cuda":
        if generator is None:
            return library.cpu_seed(_SEED_HIGH)
        where = torch.device("cpu")
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=where, generator=generator)


def _plain_reference() -> bool:
    return get_backend() == "reference"


def reparameterize(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I), differentiable in mu and logvar."""
    mu, logvar, _, _ = _prepare(mu, logvar, None, None)
    if _plain_reference():
        return reference.reparameterize(
            mu, logvar, torch.randn(mu.shape, generator=generator, device=mu.device)
        )
    return library.reparameterize(mu, logvar, _seed(generator, mu.device))


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Tensor | None = None,
    logvar_p: Tensor | None = None,
    *,
    reduction: str = "sample",
) -> Tensor:
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)) of diagonal Gaussians; N(0, I) when no prior is given."""
    reference.check_reduction(reduction)
    mu, logvar, mu_p, logvar_p = _prepare(mu, logvar, mu_p, logvar_p)
    if _plain_reference():
        return reference.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction)
    return library.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction)


def sample_and_kl(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Tensor | None = None,
    logvar_p: Tensor | None = None,
    *,
    reduction: str = "sample",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A reparameterized sample of N(mu, e^logvar) and its KL to the prior, in one fused pass."""
    reference.check_reduction(reduction)
    mu, logvar, mu_p, logvar_p = _prepare(mu, logvar, mu_p, logvar_p)
    if _plain_reference():
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        return reference.sample_and_kl(mu, logvar, eps, mu_p, logvar_p, reduction)
    return library.sample_and_kl(mu, logvar, mu_p, logvar_p, _seed(generator, mu.device), reduction)


def _pixels_in(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x as the kernels read it: float32 (float64 beside float64 parameters); values k / 255 are
    not all representable in float16 or bfloat16, so x is never computed in those."""
    return x.to(torch.float64 if dtype == torch.float64 else torch.float32)


def mixture_nll(x: Tensor, params: Tensor, *, reduction: str = "sample", one_pass: bool = False) -> Tensor:
    """-log P(x) of 8-bit images under a discretized mixture of K logistics per pixel (PixelCNN++,
    VDVAE), in nats.

    ``x``: [B, 3, H, W] in [0, 1], values k / 255. ``params``: [B, 10K, H, W], channel blocks of K:
    logits; means of R, G, B; log-scales of R, G, B (clamped below at -7); raw coefficients (tanh
    inside: G's mean is m_G + a R, B's is m_B + b R + c G) — means and x in [-1, 1] space. Edge bins
    are open; a bin with mass <= 1e-5 takes the log density at its centre. ``reduction``: ``none``
    (per pixel [B, H, W], params' dtype), ``sample`` ([B], float32), ``sum``, ``mean`` (over pixels),
    ``batchmean``. Gradients flow to ``params`` only. Any strides (channels_last included).

    ``one_pass``: where ``params`` needs a gradient and the CPU loops run, evaluate each component
    once for both passes (``fasthvae::mixture_nll_with_grad``): faster, and the backward pass keeps
    the gradient (float32, as many values as ``params``) instead of two float32 values per pixel and
    ``params`` itself. Elsewhere it changes nothing."""
    reference.check_reduction(reduction)
    _check_floating("x", x)
    _check_floating("params", params)
    if params.dim() != 4 or params.shape[1] == 0 or params.shape[1] % reference.MIXTURE_BLOCKS:
        raise ValueError(f"params must be [B, 10K, H, W] (K components), got {tuple(params.shape)}")
    b, _, h, w = params.shape
    if tuple(x.shape) != (b, 3, h, w):
        raise ValueError(
            f"x must be [{b}, 3, {h}, {w}] to match params {tuple(params.shape)}, got {tuple(x.shape)}"
        )
    if x.device != params.device:
        raise ValueError(f"x is on {x.device} but params on {params.device}")
    x = _pixels_in(x, params.dtype)
    if _plain_reference():
        nll = reference.mixture_nll(x, params)
    elif one_pass and torch.is_grad_enabled() and params.requires_grad and backend.cpu_kernels_run(params):
        nll, _ = library_likelihoods.mixture_nll_with_grad(x, params)
    else:
        nll, _ = library_likelihoods.mixture_nll(x, params)
    return reference.reduce(nll, reduction, params.dtype)


def logistic_nll(x: Tensor, mean: Tensor, log_scale: Tensor, *, reduction: str = "sample") -> Tensor:
    """-log P(x) of 8-bit values under a discretized logistic each (one per sub-pixel), in nats.

    ``x`` in [0, 1] (values k / 255), ``mean`` in [-1, 1] space, ``log_scale`` clamped below at -7;
    shapes broadcast. Edge bins open, the density stand-in below a bin mass of 1e-5, as
    :func:`mixture_nll`. Reductions as the Gaussian ops'. Gradients flow to mean and log_scale."""
    reference.check_reduction(reduction)
    for name, t in (("x", x), ("mean", mean), ("log_scale", log_scale)):
        _check_floating(name, t)
    mean, log_scale, _, _ = _prepare(mean, log_scale, None, None)
    try:
        shape = torch.broadcast_shapes(x.shape, mean.shape)
    except RuntimeError as err:
        raise ValueError(f"x{tuple(x.shape)} does not broadcast with mean{tuple(mean.shape)}") from err
    if x.device != mean.device:
        raise ValueError(f"x is on {x.device} but mean on {mean.device}")
    x, mean, log_scale = _pixels_in(x, mean.dtype).expand(shape), mean.expand(shape), log_scale.expand(shape)
    if _plain_reference():
        nll = reference.logistic_nll(x, mean, log_scale)
    else:
        nll = library_likelihoods.logistic_nll(x, mean, log_scale)
    return reference.reduce(nll.to(reference.compute_dtype(mean.dtype)), reduction, mean.dtype)
