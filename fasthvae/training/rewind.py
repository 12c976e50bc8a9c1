"""Undoing the last optimizer step taken (``--skip-rewind``).

A burst of skipped steps that lasts ``patience`` steps (:mod:`fasthvae.training.grad_skip`) means
that every batch's gradient explodes at the current weights: the last step taken moved them there.
:class:`StepRewind` keeps a copy of the parameters and the optimizer's state (AdamW's moments and
step counts) from before each step taken, and puts it back when the skip decides to rewind; the
steps after go on from there with the next batches. The EMA of the weights and the loss scale are
not rewound (one step moves the EMA by 1 - rate of it).

Copies cost one pass over the parameters and the optimizer's state per step (350 k parameters and
their moments in the deep ``small`` model). On the CPU the decision is read on the host; on a GPU
it stays a device flag, and the copy is masked arithmetic, exact for finite values.
"""

import torch


def copy_where_(dst: list[torch.Tensor], src: list[torch.Tensor], cond: torch.Tensor) -> None:
    """``dst[i] = src[i] if cond else dst[i]`` for a device bool ``cond``, without reading it back:
    dst * (1 - c) + src * c, exact for finite values when c is 0 or 1."""
    c = cond.to(dst[0].dtype)
    torch._foreach_mul_(dst, 1 - c)
    torch._foreach_add_(dst, torch._foreach_mul(src, c))


class StepRewind:
    """``rewind.keep(taken)`` before each optimizer step, ``rewind.restore(rewind)`` after it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.live: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []
        self._states = -1  # how many parameters had optimizer state when ``live`` was listed

    def _listed(self) -> list[torch.Tensor]:
        """The parameters and every tensor of their optimizer state, in a fixed order; listed anew
        when a parameter gets state (the optimizer's first steps)."""
        if len(self.optimizer.state) != self._states:
            live = []
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    state = self.optimizer.state.get(p, {})
                    live += [p.detach(), *(state[k] for k in sorted(state) if torch.is_tensor(state[k]))]
            self.live, self._states = live, len(self.optimizer.state)
            self.saved = [t.clone() for t in live]
        return self.live

    @torch.no_grad()
    def keep(self, taken: bool | torch.Tensor) -> None:
        """Before a step: copy the weights and state, if the step will be taken."""
        live = self._listed()
        self._select(self.saved, live, taken)

    @torch.no_grad()
    def restore(self, rewind: bool | torch.Tensor) -> None:
        """After a step: put back the copy, if ``rewind``."""
        live = self._listed()
        self._select(live, self.saved, rewind)

    @staticmethod
    def _select(dst: list[torch.Tensor], src: list[torch.Tensor], cond: bool | torch.Tensor) -> None:
        if isinstance(cond, torch.Tensor) and cond.device.type != "cpu":
            copy_where_(dst, src, cond)
        elif bool(cond):
            torch._foreach_copy_(dst, src)

    def state_dict(self) -> dict:
        return {"saved": [t.cpu() for t in self.saved], "states": self._states}

    def load_state_dict(self, state: dict) -> None:
        """After the optimizer's state is loaded."""
        self._listed()
        if state["states"] != self._states or len(state["saved"]) != len(self.saved):
            raise ValueError(
                f"the checkpoint's copy for --skip-rewind holds {len(state['saved'])} tensors of "
                f"{state['states']} parameters' state; this optimizer has {len(self.saved)} of {self._states}"
            )
        torch._foreach_copy_(
            self.saved, [t.to(s.device) for t, s in zip(state["saved"], self.saved, strict=True)]
        )
