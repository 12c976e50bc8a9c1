"""Shared test helpers: per-dtype tolerances and a float64 ground truth for the ops; injected bad
training steps for the trainer."""

from collections.abc import Callable

import pytest
import torch

from fasthvae.ops import backend, reference

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.gpu  # skipped without a GPU (conftest.py), selected by gpu_check.sh
# Triton runs compiled on CUDA tensors where there is a GPU, in its interpreter on CPU tensors
# elsewhere (TRITON_INTERPRET=1, set by conftest.py on machines without a GPU).
TRITON_DEVICE = "cuda" if GPU and not backend.triton_interpreted() else "cpu"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One ulp of the output dtype (results are rounded once from float32); float32 allows for the
# few float32 operations inside. ATOL is relative to the largest expected magnitude.
RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 1e-12}
ATOL = 1e-6


def subnormal_ulp(dtype: torch.dtype) -> float:
    """Spacing of the dtype's subnormal numbers: the resolution below its smallest normal."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare a result with its float64 ground truth, as tight as ``dtype`` allows.

    Where the exact value overflows the result's dtype, the result must be infinite of the same sign;
    wherever it is representable, the result must be finite and close.
    """
    expected = expected.double()
    actual_d = actual.double()
    out_max = torch.finfo(actual.dtype).max
    rtol = max(RTOL[dtype], RTOL[actual.dtype])
    overflow = expected.abs() > out_max * (1 + rtol)
    fits = expected.abs() < out_max * (1 - rtol)  # in between, rounding may go either way
    assert torch.isinf(actual_d[overflow]).all(), f"{what}: finite result where the exact value overflows"
    assert torch.isfinite(actual_d[fits]).all(), f"{what}: non-finite result where the exact value is finite"
    scale = expected[fits].abs().max().item() if fits.any() else 0.0
    torch.testing.assert_close(
        actual_d[fits],
        expected[fits],
        rtol=max(RTOL[dtype], RTOL[actual.dtype]),
        atol=ATOL * scale + subnormal_ulp(actual.dtype),
        msg=lambda m: f"{what}: {m}",
    )


def exact(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    reduction: str,
    eps: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
    """Float64 z, KL and gradients (autograd of the reference) for the given inputs and upstream grads."""
    leaves = [t.detach().double().requires_grad_() for t in (mu, logvar, mu_p, logvar_p) if t is not None]
    m, lv = leaves[0], leaves[1]
    mp, lvp = (leaves[2], leaves[3]) if mu_p is not None else (None, None)
    z = m + torch.exp(0.5 * lv) * eps.double() if eps is not None else None
    kl = reference.gaussian_kl(m, lv, mp, lvp, reduction) if grad_kl is not None else None
    loss = torch.zeros((), dtype=torch.float64)
    if z is not None:
        loss = loss + (z * grad_z.double()).sum()
    if kl is not None:
        loss = loss + (kl * grad_kl.double()).sum()
    grads = list(torch.autograd.grad(loss, leaves))
    return (None if z is None else z.detach()), (None if kl is None else kl.detach()), grads


def scale_loss_by_step(monkeypatch: pytest.MonkeyPatch, factor: Callable[[int], float]) -> dict[str, int]:
    """Multiply the training loss of the n-th objective call (from 1) by ``factor(n)``: NaN, huge
    or lasting gradients injected at chosen steps. Returns the call counter (``{"n": calls}``),
    which a test may reset between runs."""
    from fasthvae import train

    real = train.Objective.forward
    calls = {"n": 0}

    def scaled(self, x, weights):
        calls["n"] += 1
        terms = real(self, x, weights)
        terms["loss"] = terms["loss"] * factor(calls["n"])
        return terms

    monkeypatch.setattr(train.Objective, "forward", scaled)
    return calls
