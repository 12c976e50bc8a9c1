"""Multi-tensor ops for an optimizer step and its bookkeeping: one call over a whole list of tensors.

>>> from fasthvae import ops
>>> norms = ops.multi_tensor_norms(grads)           # float32 [n]: each tensor's 2-norm
>>> ops.multi_tensor_scale_(grads, factor)          # each tensor *= factor (float32, one element)
>>> ops.multi_tensor_ema_(averages, params, weight) # averages += (params - averages) * weight
>>> ops.multi_tensor_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=1e-3)  # one AdamW step

On CPU, torch's foreach ops make one dispatcher call per tensor and op; a model of a few hundred
small tensors spends more in those calls than in the arithmetic. The extension's loops take the
whole list in one call: norms with their squares summed in float64 (one rounding, at the end), the
scaling and the EMA with the roundings of torch's ops (bit-equal to them), AdamW with torch's
formula (its own order of operations: equal to torch's within a few roundings). Elsewhere (CUDA, where
torch's foreach ops are multi-tensor kernels already), under the ``reference`` backend, or for lists
the loops do not take (a tensor with gaps or overlaps, pairs laid out differently), torch's foreach
ops run (:mod:`fasthvae.ops.reference`). Registered with ``torch.library`` (namespace ``fasthvae``):
torch.compile traces each call as one node; eager calls go to the loops directly.
"""

import torch
from torch import Tensor

from fasthvae.ops import backend, reference


def _loops_take(*lists: list[Tensor]) -> bool:
    """Whether the CPU loops run these lists (else torch's foreach ops do)."""
    ext = backend.extension()
    if not lists[0] or ext is None or backend.get_backend() == "reference":
        return False
    return ext.multi_tensor_takes(list(lists))


def _norms_now(tensors: list[Tensor]) -> Tensor:
    if _loops_take(tensors):
        return backend.extension().multi_tensor_norms(tensors)
    return reference.multi_tensor_norms(tensors)


def _scale_now(tensors: list[Tensor], factor: Tensor) -> None:
    if _loops_take(tensors) and factor.device.type == "cpu":
        backend.extension().multi_tensor_scale_(tensors, factor)
    else:
        reference.multi_tensor_scale_(tensors, factor)


def _ema_now(averages: list[Tensor], values: list[Tensor], weight: Tensor) -> None:
    if _loops_take(averages, values) and weight.device.type == "cpu":
        backend.extension().multi_tensor_ema_(averages, values, weight)
    else:
        reference.multi_tensor_ema_(averages, values, weight)


def _adamw_now(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    found_inf: Tensor | None,
) -> None:
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    args = (params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps, found_inf)
    # The step counters must be float32 CPU scalars beside CPU tensors: the loops say so if not.
    if _loops_take(*lists) and (found_inf is None or found_inf.device.type == "cpu"):
        backend.extension().multi_tensor_adamw_(*args)
    else:
        reference.multi_tensor_adamw_(*args)


# The registered ops, which torch.compile traces as single nodes; eager calls skip their dispatch,
# which costs more than the loops for a few hundred tensors.
_norms = torch.library.custom_op("fasthvae::multi_tensor_norms", _norms_now, mutates_args=())
_scale = torch.library.custom_op("fasthvae::multi_tensor_scale_", _scale_now, mutates_args=("tensors",))
_ema = torch.library.custom_op("fasthvae::multi_tensor_ema_", _ema_now, mutates_args=("averages",))
_adamw = torch.library.custom_op(
    "fasthvae::multi_tensor_adamw_",
    _adamw_now,
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps"),
)


@_norms.register_fake
def _(tensors: list[Tensor]) -> Tensor:
    return tensors[0].new_empty(len(tensors), dtype=torch.float32)


@_scale.register_fake
def _(tensors: list[Tensor], factor: Tensor) -> None:
    return None


@_ema.register_fake
def _(averages: list[Tensor], values: list[Tensor], weight: Tensor) -> None:
    return None


@_adamw.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps, found_inf) -> None:
    return None


def _scalar(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor) or t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor, got {t!r}")
    return t.reshape(()).float()


def multi_tensor_norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's 2-norm, float32 [n] (inf or NaN where the tensor has one)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0)
    return _norms(tensors) if torch.compiler.is_compiling() else _norms_now(tensors)


def multi_tensor_scale_(tensors: list[Tensor], factor: Tensor) -> None:
    """Each tensor *= ``factor`` (a one-element tensor, taken in float32), in place."""
    tensors, factor = list(tensors), _scalar(factor, "factor")
    (_scale if torch.compiler.is_compiling() else _scale_now)(tensors, factor)


def multi_tensor_ema_(averages: list[Tensor], values: list[Tensor], weight: Tensor) -> None:
    """``averages[i] += (values[i] - averages[i]) * weight`` for every i, in place; ``weight`` a
    one-element tensor, taken in float32."""
    averages, values, weight = list(averages), list(values), _scalar(weight, "weight")
    if len(averages) != len(values):
        raise ValueError(f"{len(averages)} averages but {len(values)} values")
    (_ema if torch.compiler.is_compiling() else _ema_now)(averages, values, weight)


def multi_tensor_adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    eps: float = 1e-8,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamW step of every parameter, in place: ``steps[i]`` (float32 scalars, as torch's AdamW
    keeps them) += 1, the moments ``exp_avgs`` and ``exp_avg_sqs`` updated, then ``params``, with the
    weight decay decoupled (torch.optim.AdamW's rule). Where ``found_inf`` (a one-element tensor) is
    nonzero, nothing changes, the counters neither."""
    lists = [list(x) for x in (params, grads, exp_avgs, exp_avg_sqs, steps)]
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"AdamW's lists differ in length: {[len(x) for x in lists]}")
    if found_inf is not None:
        found_inf = _scalar(found_inf, "found_inf")
    args = (*lists, float(lr), float(betas[0]), float(betas[1]), float(weight_decay), float(eps), found_inf)
    (_adamw if torch.compiler.is_compiling() else _adamw_now)(*args)
