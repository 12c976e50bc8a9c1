"""The fused ops as ``torch.library`` custom ops: real kernels, fake kernels and autograd.

Registered ops (namespace ``fasthvae``): ``gaussian_kl``, ``reparameterize``, ``sample_and_kl``,
their shared ``gaussian_backward``, and ``cpu_seed`` (the seeds' draw on the CPU).
``torch.compile(fullgraph=True)`` traces them as single nodes. Noise comes from a per-call int64
seed tensor and is regenerated in the backward pass, so no eps is ever saved. Double backward is
not supported.

Memory layout: the kernels walk tensors in memory order. When ``logvar``'s strides put the batch
dim outermost in another order than the plain one (``channels_last``, or the channel halves that
``chunk(2, 1)`` makes of a channels_last tensor), inputs go to the kernels in that order, and
outputs and gradients come back in it (dense). The CPU loops read any input whose elements lie in
evenly spaced rows of contiguous elements where it lies (a dense tensor, a channel half of a
channels_last or an NCHW tensor); the GPU kernels take such slices compacted, one copy each; any
other layout goes through ``.contiguous()``. Noise follows the order the kernels walk: a
channels_last input gets the noise of its NHWC-contiguous twin.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from fasthvae.ops import backend, reference
from fasthvae.ops.philox import philox_randn
from fasthvae.ops.reference import KL_ELEMENTWISE, KL_NONE, KL_ROWS

Order = tuple[int, ...] | None


def _tag_compile_caches() -> None:
    """Put into torch.compile's cache keys two things the compiled code depends on and the keys miss
    (torch 2.14.1), appended to any tag the user set:

    - a fingerprint of these ops' code: Inductor's on-disk cache keys a graph by its nodes, not by
      the fake kernels of the custom ops in it, so a graph compiled against another fasthvae would be
      reused with that version's output layouts (Inductor then fails its stride assertions);
    - the CPU code path, ATen's capability (``ATEN_CPU_CAPABILITY`` caps it): Inductor vectorizes
      its C++ kernels for it, so a graph compiled under another cap would be reused vectorized for
      the other width, computing wrong values or storing past its buffers' ends."""
    sources = sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    tag = f"fasthvae-ops-{digest}-cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag


_tag_compile_caches()


def memory_order(t: Tensor) -> Order:
    """The dims of ``t`` by falling stride when the batch dim is outermost and that order is not the
    plain one (channels_last, or channel halves of a channels_last tensor): the layout the kernels
    take ``t`` and return its outputs in. None for the plain order and anything else."""
    if t.dim() < 3 or t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    if order[0] != 0 or order == tuple(range(t.dim())):
        return None
    return order


def _in_order(t: Tensor | None, order: Order) -> Tensor | None:
    """``t`` as the kernels take it: contiguous in ``order`` (a view when it already lies so)."""
    if t is None:
        return None
    return t.contiguous() if order is None else t.permute(order).contiguous()


def _viewed_in_order(t: Tensor | None, order: Order) -> Tensor | None:
    """``t`` with its dims in ``order`` (a view): what the CPU loops take, reading rows of contiguous
    elements where they lie (a channel half of a channels_last tensor: no compacting copy)."""
    return t if t is None or order is None else t.permute(order)


def _placer(name: str) -> Callable[[Tensor | None, Order], Tensor | None]:
    """How a backend's kernels take an input in the kernels' order: a view for the CPU loops,
    a contiguous tensor for the others."""
    return _viewed_in_order if name == "cpu" else _in_order


def _restore(t: Tensor | None, order: Order) -> Tensor | None:
    """A kernel's output in ``order`` back to the callers' dim order (a view)."""
    if t is None or order is None:
        return t
    return t.permute(sorted(range(len(order)), key=order.__getitem__))


def _empty_like_op(t: Tensor) -> Tensor:
    """An uninitialised tensor shaped and laid out as the kernels' elementwise outputs for ``t``."""
    order = memory_order(t)
    if order is None:
        return t.new_empty(t.shape)
    return _restore(t.new_empty([t.shape[d] for d in order]), order)


def _seed_on(seed: Tensor | None, device: torch.device) -> Tensor | None:
    """The seed where the kernels read it: on the inputs' device (a copy only if it is elsewhere)."""
    return None if seed is None else seed.reshape(1).to(device=device, dtype=torch.int64)


def _kl_mode(reduction: str) -> int:
    return KL_ELEMENTWISE if reduction == "none" else KL_ROWS


def _finish_kl(kl: Tensor, reduction: str, like: Tensor) -> Tensor:
    """Turn the kernels' row sums into the requested reduction (elementwise KL passes through)."""
    if reduction in ("none", "sample"):
        return kl
    total = kl.sum()
    if reduction == "mean":
        return total / max(like.numel(), 1)
    if reduction == "batchmean":
        return total / max(reference.num_rows(like), 1)
    return total


def _reference_forward(mu, logvar, mu_p, logvar_p, seed, sample, kl_mode):
    z = kl = None
    if sample:
        eps = philox_randn(seed, mu.numel(), mu.device).view(mu.shape)
        z = reference.reparameterize(mu, logvar, eps)
    if kl_mode != KL_NONE:
        kl = reference.kl_elementwise(mu, logvar, mu_p, logvar_p)
        kl = kl.to(mu.dtype) if kl_mode == KL_ELEMENTWISE else reference.row_sums(kl)
    return z, kl


def _forward(mu, logvar, mu_p, logvar_p, seed: Tensor | None, sample: bool, kl_mode: int):
    """Run the selected backend's forward kernel: (z or None, elementwise KL / row sums or None)."""
    order = memory_order(logvar)
    name = backend.resolve(mu.device, mu.dtype)
    place = _placer(name)
    mu, logvar, mu_p, logvar_p = (place(t, order) for t in (mu, logvar, mu_p, logvar_p))
    if name in ("cpu", "cuda", "triton"):
        kernels = backend.triton_kernels() if name == "triton" else backend.extension()
        z, kl = kernels.forward(mu, logvar, mu_p, logvar_p, _seed_on(seed, mu.device), sample, kl_mode)
    else:
        z, kl = _reference_forward(mu, logvar, mu_p, logvar_p, _seed_on(seed, mu.device), sample, kl_mode)
    return _restore(z, order), (_restore(kl, order) if kl_mode == KL_ELEMENTWISE else kl)


def _kl_like(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return _empty_like_op(logvar)
    ct = reference.compute_dtype(mu.dtype)
    return mu.new_empty((reference.num_rows(mu),) if reduction == "sample" else (), dtype=ct)


# ---- cpu_seed -------------------------------------------------------------------------------


@torch.library.custom_op("fasthvae::cpu_seed", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def cpu_seed(high: int) -> Tensor:
    """``torch.randint(0, high, ())`` from PyTorch's CPU generator (the same draw), as an op of its
    own: in a compiled graph Inductor's C++ wrapper cannot pass randint's dtype argument to it.
    Tagged random, so that no compiler pass merges two draws or recomputes one."""
    return torch.randint(0, high, (), dtype=torch.int64)


@cpu_seed.register_fake
def _(high):
    return torch.empty((), dtype=torch.int64)


def _spare_seed_draws_from_cse() -> None:
    """AOTAutograd's common-subexpression pass over the training graph spares random ops by a list
    of aten's (torch 2.11; later versions also read the tag): two ``cpu_seed`` draws with the same
    argument would become one, and every latent group of a compiled step would share its noise.
    Listing the op there keeps each draw its own; where torch no longer has the list, nothing to do."""
    try:
        from torch._functorch import compile_utils
    except ImportError:
        return
    spared = getattr(compile_utils, "rand_ops", None)
    if isinstance(spared, list) and torch.ops.fasthvae.cpu_seed not in spared:
        spared.append(torch.ops.fasthvae.cpu_seed)


_spare_seed_draws_from_cse()


# ---- gaussian_kl ----------------------------------------------------------------------------


@torch.library.custom_op("fasthvae::gaussian_kl", mutates_args=())
def gaussian_kl(
    mu: Tensor, logvar: Tensor, mu_p: Tensor | None, logvar_p: Tensor | None, reduction: str
) -> Tensor:
    _, kl = _forward(mu, logvar, mu_p, logvar_p, None, False, _kl_mode(reduction))
    return _finish_kl(kl, reduction, mu)


@gaussian_kl.register_fake
def _(mu, logvar, mu_p, logvar_p, reduction):
    return _kl_like(mu, logvar, reduction)


# ---- reparameterize -------------------------------------------------------------------------


@torch.library.custom_op("fasthvae::reparameterize", mutates_args=())
def reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor) -> Tensor:
    z, _ = _forward(mu, logvar, None, None, seed, True, KL_NONE)
    return z


@reparameterize.register_fake
def _(mu, logvar, seed):
    return _empty_like_op(logvar)


# ---- sample_and_kl --------------------------------------------------------------------------


@torch.library.custom_op("fasthvae::sample_and_kl", mutates_args=())
def sample_and_kl(
    mu: Tensor, logvar: Tensor, mu_p: Tensor | None, logvar_p: Tensor | None, seed: Tensor, reduction: str
) -> tuple[Tensor, Tensor]:
    z, kl = _forward(mu, logvar, mu_p, logvar_p, seed, True, _kl_mode(reduction))
    return z, _finish_kl(kl, reduction, mu)


@sample_and_kl.register_fake
def _(mu, logvar, mu_p, logvar_p, seed, reduction):
    return _empty_like_op(logvar), _kl_like(mu, logvar, reduction)


# ---- the shared backward --------------------------------------------------------------------


@torch.library.custom_op("fasthvae::gaussian_backward", mutates_args=())
def gaussian_backward(
    mu: Tensor | None,
    logvar: Tensor,
    mu_p: Tensor | None,
    logvar_p: Tensor | None,
    seed: Tensor | None,
    grad_z: Tensor | None,
    grad_kl: Tensor | None,
    grad_kl_rows: bool,
) -> list[Tensor]:
    """[dmu, dlogvar(, dmu_p, dlogvar_p)] of sum(grad_z * z) + sum(grad_kl * kl)."""
    order = memory_order(logvar)
    place = _placer(backend.resolve(logvar.device, logvar.dtype))
    if grad_kl is not None:  # per row: float32 [rows]; elementwise: laid out as logvar
        grad_kl = grad_kl.contiguous() if grad_kl_rows else place(grad_kl.to(logvar.dtype), order)
    mu, logvar, mu_p, logvar_p, grad_z = (place(t, order) for t in (mu, logvar, mu_p, logvar_p, grad_z))
    return [
        _restore(g, order) for g in _backward(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl, grad_kl_rows)
    ]


def _backward(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl, grad_kl_rows) -> list[Tensor]:
    """Run the selected backend's backward kernel on inputs in the kernels' layout."""
    name = backend.resolve(logvar.device, logvar.dtype)
    if name in ("cpu", "cuda"):
        grads = backend.extension().backward(
            mu if mu is not None else logvar,
            logvar,
            mu_p,
            logvar_p,
            _seed_on(seed, logvar.device),
            grad_z,
            grad_kl,
            grad_kl_rows,
        )
        return [g for g in grads if g is not None]
    if name == "triton":
        return backend.triton_kernels().backward(
            mu, logvar, mu_p, logvar_p, _seed_on(seed, logvar.device), grad_z, grad_kl, grad_kl_rows
        )
    eps = None
    if grad_z is not None:
        eps = philox_randn(_seed_on(seed, logvar.device), logvar.numel(), logvar.device).view(logvar.shape)
    return reference.gaussian_backward(mu, logvar, mu_p, logvar_p, eps, grad_z, grad_kl, grad_kl_rows)


@gaussian_backward.register_fake
def _(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl, grad_kl_rows):
    n = 4 if mu_p is not None else 2
    return [_empty_like_op(logvar) for _ in range(n)]


def _kl_grad(grad: Tensor | None, reduction: str, like: Tensor) -> tuple[Tensor | None, bool]:
    """The KL's upstream gradient as the kernels take it, and whether it is per row."""
    if grad is None or reduction == "none":
        return grad, False
    return reference.kl_grad_rows(grad, reduction, reference.num_rows(like), like.numel()), True


def _with_prior_grads(grads: list[Tensor], has_prior: bool) -> tuple:
    return (grads[0], grads[1], grads[2], grads[3]) if has_prior else (grads[0], grads[1], None, None)


def _kl_setup(ctx, inputs, output):
    mu, logvar, mu_p, logvar_p, reduction = inputs
    ctx.save_for_backward(mu, logvar, mu_p, logvar_p)
    ctx.reduction = reduction


def _kl_backward(ctx, grad):
    mu, logvar, mu_p, logvar_p = ctx.saved_tensors
    grad_kl, rows = _kl_grad(grad, ctx.reduction, mu)
    grads = gaussian_backward(mu, logvar, mu_p, logvar_p, None, None, grad_kl, rows)
    return (*_with_prior_grads(grads, mu_p is not None), None)


def _reparameterize_setup(ctx, inputs, output):
    _, logvar, seed = inputs
    ctx.save_for_backward(logvar, seed)


def _reparameterize_backward(ctx, grad):
    logvar, seed = ctx.saved_tensors
    _, dlogvar = gaussian_backward(None, logvar, None, None, seed, grad, None, False)
    return grad, dlogvar, None


def _sample_and_kl_setup(ctx, inputs, output):
    mu, logvar, mu_p, logvar_p, seed, reduction = inputs
    ctx.save_for_backward(mu, logvar, mu_p, logvar_p, seed)
    ctx.reduction = reduction


def _sample_and_kl_backward(ctx, grad_z, grad_kl):
    mu, logvar, mu_p, logvar_p, seed = ctx.saved_tensors
    grad_kl, rows = _kl_grad(grad_kl, ctx.reduction, mu)
    grads = gaussian_backward(mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl, rows)
    return (*_with_prior_grads(grads, mu_p is not None), None, None)


gaussian_kl.register_autograd(_kl_backward, setup_context=_kl_setup)
reparameterize.register_autograd(_reparameterize_backward, setup_context=_reparameterize_setup)
sample_and_kl.register_autograd(_sample_and_kl_backward, setup_context=_sample_and_kl_setup)
