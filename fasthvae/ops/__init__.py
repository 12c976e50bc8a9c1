"""Fused Gaussian ops: reparameterized sampling and diagonal-Gaussian KL, forward and backward.

>>> from fasthvae.ops import reparameterize, gaussian_kl, sample_and_kl
>>> z = reparameterize(mu, logvar)                     # mu + exp(logvar / 2) * eps
>>> kl = gaussian_kl(mu, logvar)                       # KL(N(mu, e^logvar) || N(0, I)), per sample
>>> kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)   # KL(q || p)
>>> z, kl = sample_and_kl(mu, logvar, mu_p, logvar_p)  # both in one pass

Reductions: ``none`` (elementwise, input dtype), ``sample`` (sum over all dims but the first,
shape [B]), ``sum``, ``mean``, ``batchmean`` (sum / B); reduced results are float32 (float64 for
float64 inputs). Arithmetic is float32 for float32/float16/bfloat16 inputs. Shapes broadcast.
The backend is chosen per device (see :mod:`fasthvae.ops.backend`).
"""

import torch
from torch import Tensor

from fasthvae.ops import library, reference
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
from fasthvae.ops.reference import REDUCTIONS

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "cpu_isa",
    "cpu_isas",
    "gaussian_kl",
    "get_backend",
    "reparameterize",
    "sample_and_kl",
    "set_backend",
    "set_cpu_isa",
    "use_backend",
    "use_cpu_isa",
]

_SEED_HIGH = 2**63 - 1


def _prepare(
    mu: Tensor, logvar: Tensor, mu_p: Tensor | None, logvar_p: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validate the Gaussians' parameters; broadcast them to one shape and one floating dtype."""
    named = {"mu": mu, "logvar": logvar, "mu_p": mu_p, "logvar_p": logvar_p}
    given = {k: v for k, v in named.items() if v is not None}
    for name, t in given.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
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
