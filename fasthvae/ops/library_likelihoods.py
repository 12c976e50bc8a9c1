"""The discretized-logistic likelihoods as ``torch.library`` custom ops: kernels, fake kernels, autograd.

Registered ops (namespace ``fasthvae``): ``mixture_nll`` and its ``mixture_nll_backward``,
``mixture_nll_with_grad`` (both passes at once, CPU), ``logistic_nll`` and its
``logistic_nll_backward``. ``torch.compile(fullgraph=True)`` traces each as one node. Kernels:
the CPU C++ loops of ``fasthvae._C`` on CPU tensors, Triton on CUDA tensors (and on CPU tensors
under ``TRITON_INTERPRET=1`` with the ``triton`` backend), the PyTorch reference for float64 and
where neither runs (the ``cuda`` backend has no likelihood kernels: it takes Triton when Triton is
installed). Double backward is not supported.

``mixture_nll`` returns, per pixel, -log P(x) and the logsumexp of the logits (float32; float64 for
float64 parameters); the backward pass takes both back instead of saving any per-component tensor.
x gets no gradient (it is data). The mixture kernels read x and the parameters with any strides;
the single logistic's take its inputs dense in the log-scale's memory order (library.memory_order).
"""

import importlib

import torch
from torch import Tensor

from fasthvae.ops import backend, reference
from fasthvae.ops.library import _empty_like_op, _in_order, _restore, memory_order


def _kernels(t: Tensor) -> str:
    """``cpu``, ``triton`` or ``reference``: what runs the likelihood kernels on ``t``."""
    name = backend.resolve(t.device, t.dtype)
    if name == "cuda":
        return "triton" if backend.available("triton", t.device) else "reference"
    return name


def _triton():
    return importlib.import_module("fasthvae.ops.triton_likelihoods")


# ---- mixture_nll ----------------------------------------------------------------------------


@torch.library.custom_op("fasthvae::mixture_nll", mutates_args=())
def mixture_nll(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """(-log P(x) per pixel [B, H, W], logsumexp of the logits per pixel); x float32 [B, 3, H, W]."""
    name = _kernels(params)
    if name == "cpu":
        nll, lse = backend.extension().mixture_forward(x, params)
    elif name == "triton":
        nll, lse = _triton().mixture_forward(x, params)
    else:
        nll = reference.mixture_nll(x, params)
        k = params.shape[1] // reference.MIXTURE_BLOCKS
        lse = torch.logsumexp(params[:, :k].to(nll.dtype), 1)
    return nll, lse


@mixture_nll.register_fake
def _(x, params):
    shape = (params.shape[0], params.shape[2], params.shape[3])
    dtype = reference.compute_dtype(params.dtype)
    return params.new_empty(shape, dtype=dtype), params.new_empty(shape, dtype=dtype)


@torch.library.custom_op("fasthvae::mixture_nll_backward", mutates_args=())
def mixture_nll_backward(x: Tensor, params: Tensor, nll: Tensor, lse_logits: Tensor, grad: Tensor) -> Tensor:
    """The gradient of sum(grad * nll) in params, laid out as empty_like(params)."""
    name = _kernels(params)
    if name == "cpu":
        return backend.extension().mixture_backward(x, params, nll, lse_logits, grad)
    if name == "triton":
        return _triton().mixture_backward(x, params, nll, lse_logits, grad)
    _, vjp = torch.func.vjp(lambda p: reference.mixture_nll(x, p), params)  # autograd is off in here
    return torch.empty_like(params).copy_(vjp(grad.to(nll.dtype))[0])  # the layout the fake promises


@mixture_nll_backward.register_fake
def _(x, params, nll, lse_logits, grad):
    return torch.empty_like(params)


def _mixture_setup(ctx, inputs, output):
    x, params = inputs
    nll, lse_logits = output
    ctx.save_for_backward(x, params, nll, lse_logits)
    ctx.mark_non_differentiable(lse_logits)


def _mixture_backward(ctx, grad_nll, grad_lse):
    x, params, nll, lse_logits = ctx.saved_tensors
    grad = grad_nll.to(nll.dtype).contiguous()
    return None, mixture_nll_backward(x, params, nll, lse_logits, grad)


mixture_nll.register_autograd(_mixture_backward, setup_context=_mixture_setup)


@torch.library.custom_op("fasthvae::mixture_nll_with_grad", mutates_args=())
def mixture_nll_with_grad(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """(-log P(x) per pixel, the gradient of its sum in params, float32) from one pass of the CPU
    loops, which evaluate each component once where ``mixture_nll``'s forward and backward evaluate
    it twice; the backward pass scales the saved gradient by each pixel's. CPU kernels only
    (``backend.cpu_kernels_run``)."""
    return tuple(backend.extension().mixture_forward_backward(x, params))


@mixture_nll_with_grad.register_fake
def _(x, params):
    shape = (params.shape[0], params.shape[2], params.shape[3])
    return params.new_empty(shape, dtype=torch.float32), torch.empty_like(params, dtype=torch.float32)


def _with_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.params_dtype = inputs[1].dtype


def _with_grad_backward(ctx, grad_nll, grad_d):
    (d_params,) = ctx.saved_tensors  # float32: one rounding to params' dtype, after the product
    return None, (d_params * grad_nll.unsqueeze(1)).to(ctx.params_dtype)


mixture_nll_with_grad.register_autograd(_with_grad_backward, setup_context=_with_grad_setup)


# ---- logistic_nll ---------------------------------------------------------------------------


@torch.library.custom_op("fasthvae::logistic_nll", mutates_args=())
def logistic_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log P(x) elementwise, in mean's dtype (x float32, all of one shape)."""
    order = memory_order(log_scale)
    x, mean, log_scale = (_in_order(t, order) for t in (x, mean, log_scale))
    name = _kernels(mean)
    if name == "reference":
        nll = reference.logistic_nll(x, mean, log_scale).to(mean.dtype)
    else:
        nll = (backend.extension() if name == "cpu" else _triton()).logistic_forward(x, mean, log_scale)
    return _restore(nll, order)


@logistic_nll.register_fake
def _(x, mean, log_scale):
    return _empty_like_op(log_scale)


@torch.library.custom_op("fasthvae::logistic_nll_backward", mutates_args=())
def logistic_nll_backward(x: Tensor, mean: Tensor, log_scale: Tensor, grad: Tensor) -> list[Tensor]:
    """[d mean, d log_scale] of sum(grad * nll)."""
    order = memory_order(log_scale)
    x, mean, log_scale, grad = (_in_order(t, order) for t in (x, mean, log_scale, grad.to(mean.dtype)))
    name = _kernels(mean)
    if name == "reference":
        out, vjp = torch.func.vjp(lambda m, s: reference.logistic_nll(x, m, s), mean, log_scale)
        grads = [g.to(mean.dtype) for g in vjp(grad.to(out.dtype))]
    else:
        grads = (backend.extension() if name == "cpu" else _triton()).logistic_backward(
            x, mean, log_scale, grad
        )
    return [_restore(g, order) for g in grads]


@logistic_nll_backward.register_fake
def _(x, mean, log_scale, grad):
    return [_empty_like_op(log_scale), _empty_like_op(log_scale)]


def _logistic_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _logistic_backward(ctx, grad):
    x, mean, log_scale = ctx.saved_tensors
    d_mean, d_log_scale = logistic_nll_backward(x, mean, log_scale, grad)
    return None, d_mean, d_log_scale


logistic_nll.register_autograd(_logistic_backward, setup_context=_logistic_setup)
