"""AdamW whose fused CPU step is one call for the whole parameter list.

torch's fused AdamW on CPU sets its parameter group up in Python (a loop over the parameters), runs
one kernel region per parameter and counts steps with one call per parameter: for the deep model's
417 small tensors that costs more than the arithmetic. :class:`AdamW` keeps torch's state (``step``,
``exp_avg``, ``exp_avg_sq`` per parameter: state dicts go both ways between the two) and, where it
applies, steps every parameter of a group with ``ops.multi_tensor_adamw_`` over lists it keeps.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from fasthvae import ops
from fasthvae.ops import backend

Lists = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]  # params, exp_avgs, exp_avg_sqs, steps


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``, taking the same arguments. With ``fused=True``, every parameter on the
    CPU, the C++ extension loaded, and none of ``amsgrad``, ``maximize``, ``capturable``,
    ``differentiable`` or a GradScaler's ``grad_scale``, a step is one multi-tensor call per group
    (honouring ``found_inf`` as the fused AdamW does); otherwise, or while a parameter has no
    gradient, it is torch's own step. Where the parameters lie is looked at once (move the model
    before making its optimizer, as with torch's)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._lists: list[Lists] | None = None
        self._on_cpu: bool | None = None  # every parameter on the CPU, as last looked

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._lists = self._on_cpu = None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._lists = self._on_cpu = None

    def _multi_tensor_applies(self) -> bool:
        if getattr(self, "grad_scale", None) is not None or backend.extension() is None:
            return False
        if backend.get_backend() == "reference":
            return False
        if self._on_cpu is None:
            self._on_cpu = all(p.device.type == "cpu" for g in self.param_groups for p in g["params"])
        return self._on_cpu and all(
            g["fused"] and not (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"])
            for g in self.param_groups
        )

    def _group_lists(self) -> list[Lists]:
        """Each group's parameters with their state tensors, the state made where it is missing (as
        torch's fused AdamW makes it: a float32 step counter, moments shaped and laid out as the
        parameter)."""
        if self._lists is None:
            self._lists = []
            for group in self.param_groups:
                for p in group["params"]:
                    if not self.state[p]:
                        self.state[p] = {
                            "step": torch.zeros((), dtype=torch.float32),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                        }
                states = [self.state[p] for p in group["params"]]
                state_lists = ([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))
                self._lists.append((list(group["params"]), *state_lists))
        return self._lists

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if not self._multi_tensor_applies():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [[p.grad for p in g["params"]] for g in self.param_groups]
        if any(grad is None for group in grads for grad in group):
            self._lists = self._on_cpu = None  # torch makes the state of the parameters it steps
            super().step()
            return loss
        found_inf = getattr(self, "found_inf", None)
        for group, group_grads, (params, exp_avgs, exp_avg_sqs, steps) in zip(
            self.param_groups, grads, self._group_lists(), strict=True
        ):
            lr = group["lr"]
            ops.multi_tensor_adamw_(
                params, group_grads, exp_avgs, exp_avg_sqs, steps,
                lr=lr.item() if isinstance(lr, Tensor) else lr, betas=group["betas"],
                weight_decay=group["weight_decay"], eps=group["eps"], found_inf=found_inf,
            )  # fmt: skip
        return loss
