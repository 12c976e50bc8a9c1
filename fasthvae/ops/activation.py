"""A GELU that keeps its derivative for the backward pass.

>>> from fasthvae.ops import gelu
>>> y = gelu(x)            # F.gelu(x) (the exact, erf form), its backward one multiply

ATen's GELU, and Inductor's compiled one, save the input and evaluate the error function and an
exponential again in the backward pass. ``fasthvae::gelu`` writes gelu(x) and gelu'(x) in one
pass over x, from one exponential (``csrc/gelu_cpu.cpp``), and its backward multiplies the incoming
gradient by the saved gelu'(x): the same memory saved (the derivative in place of the input) and no
transcendental work left for the backward. The derivative is computed only where x needs a gradient.

CPU tensors of float32, float16 or bfloat16 (arithmetic in float32; the error function as ATen's
vectorized CPU one, Abramowitz and Stegun 7.1.26, absolute error <= 1.5e-7; results in x's dtype
and layout); elsewhere, under the ``reference`` backend, or for float64, :func:`gelu` is ``F.gelu``.
Registered with ``torch.library`` (the kernel in C++, which a call reaches from the dispatcher with
no Python implementation in between; the fake kernel and autograd here, when ``fasthvae._C`` loads):
``torch.compile(fullgraph=True)`` traces it as one node forward and a multiply backward. Double
backward is not supported.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from fasthvae.ops import backend


def _register() -> None:
    @torch.library.register_fake("fasthvae::gelu")
    def _(x: Tensor, derivative: bool) -> tuple[Tensor, Tensor]:
        # empty_like keeps x's strides where x is dense, else lays out as x.suggest_memory_format(),
        # as the kernel does
        return torch.empty_like(x), torch.empty_like(x) if derivative else x.new_empty(0)

    # gelu(x) in bfloat16, gelu'(x) in x's dtype: the GELU of fasthvae_onednn::gelu_conv2d, which calls
    # it from C++ (no autograd of its own).
    @torch.library.register_fake("fasthvae::gelu_bfloat16")
    def _(x: Tensor, derivative: bool) -> tuple[Tensor, Tensor]:
        d = torch.empty_like(x) if derivative else x.new_empty(0)
        return torch.empty_like(x, dtype=torch.bfloat16), d

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_y: Tensor, grad_d: Tensor) -> tuple[Tensor, None]:
        (d,) = ctx.saved_tensors
        if d.numel() == 0 and grad_y.numel() != 0:
            raise RuntimeError("fasthvae::gelu was called with derivative=False; call fasthvae.ops.gelu")
        return grad_y * d, None

    torch.library.register_autograd("fasthvae::gelu", backward, setup_context=setup_context)


if backend.extension() is not None:
    _register()


def fused_gelu_runs(x: Tensor) -> bool:
    """Whether :func:`gelu` runs the fused op on ``x`` (else ``F.gelu``)."""
    return backend.cpu_kernels_run(x)  # fasthvae._C loaded: its import registered the op


def gelu(x: Tensor) -> Tensor:
    """``F.gelu(x)``, its derivative written by the same pass (see the module's docstring)."""
    if not fused_gelu_runs(x):
        return F.gelu(x)
    y, _ = torch.ops.fasthvae.gelu(x, torch.is_grad_enabled() and x.requires_grad)
    return y
