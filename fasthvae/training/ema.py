"""An exponential moving average of a model's weights, the copy that evaluation and sampling use."""

import copy

import torch
from torch import nn

from fasthvae import ops

Tensors = tuple[list[torch.Tensor], list[torch.Tensor]]  # a model's parameters and buffers


class EMA:
    """``rate`` r: after each update, ema = r * ema + (1 - r) * weights; the effective rate is
    min(r, (1 + n) / (10 + n)) after n updates, so early averages are not dragged by the random
    initialisation. Buffers (BatchNorm statistics) are copied, not averaged. The update count lives
    on the device, so an update can depend on a device flag (a skipped step) without a host read."""

    def __init__(self, model: nn.Module, rate: float) -> None:
        if not 0 < rate < 1:
            raise ValueError(f"the EMA rate must be in (0, 1), got {rate}")
        self.rate = rate
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(model.parameters()).device
        self.updates_t = torch.zeros((), dtype=torch.float32, device=device)
        # The tensor lists are kept: walking a deep model's modules for them each step costs more
        # than the update itself. So a model's parameters are those it had at its first update.
        self._tensors = self._tensors_of(self.model)
        self._source: tuple[nn.Module, Tensors] | None = None

    @staticmethod
    def _tensors_of(model: nn.Module) -> Tensors:
        return list(model.parameters()), list(model.buffers())

    def _source_tensors(self, model: nn.Module) -> Tensors:
        if self._source is None or self._source[0] is not model:
            self._source = (model, self._tensors_of(model))
        return self._source[1]

    @property
    def updates(self) -> int:
        return int(self.updates_t)

    def current_rate(self) -> torch.Tensor:
        n = self.updates_t
        return torch.clamp((1 + n) / (10 + n), max=self.rate)

    @torch.no_grad()
    def update(self, model: nn.Module, taken: torch.Tensor | None = None) -> None:
        """Average ``model`` in; with ``taken`` (a device bool) only where it is True."""
        take = torch.ones((), device=self.updates_t.device) if taken is None else taken.float()
        weight = (1 - self.current_rate()) * take
        (params, buffers), (ema_params, ema_buffers) = self._source_tensors(model), self._tensors
        ops.multi_tensor_ema_(ema_params, params, weight)
        for ema_buffer, buffer in zip(ema_buffers, buffers, strict=True):
            ema_buffer.copy_(torch.where(take.bool(), buffer, ema_buffer))
        self.updates_t += take

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "rate": self.rate}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates_t.fill_(state["updates"])
