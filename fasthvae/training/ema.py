"""An exponential moving average of a model's weights, the copy that evaluation and sampling use."""

import copy

import torch
from torch import nn


class EMA:
    """``rate`` r: after each update, ema = r * ema + (1 - r) * weights; the effective rate is
    min(r, (1 + n) / (10 + n)) after n updates, so early averages are not dragged by the random
    initialisation. Buffers (BatchNorm statistics) are copied, not averaged."""

    def __init__(self, model: nn.Module, rate: float) -> None:
        if not 0 < rate < 1:
            raise ValueError(f"the EMA rate must be in (0, 1), got {rate}")
        self.rate = rate
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_rate(self) -> float:
        return min(self.rate, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - self.current_rate())
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
