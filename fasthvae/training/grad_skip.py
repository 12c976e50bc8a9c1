"""Update skipping with a threshold that follows the run's own gradient norms.

A fixed skip threshold (VDVAE's) can stall a run whose gradient norms drift above it: every step is
skipped from then on. Here a step is skipped when its gradient norm is not finite or exceeds
``factor`` times the median of the last ``window`` finite norms, unless the ``patience`` steps before
it were all above the threshold too: a spike lasting ``patience`` steps is a change of scale (a KL
weight switching on, say), and steps go on from then (clipped as usual) while the skipped norms,
which enter the window too, move its median. So no run waits more than ``patience`` steps on the
threshold, which the trainer keeps below its consecutive-skip limit. The first ``warmup`` norms only
skip on non-finite values.

With ``rewind``, the first streak that reaches ``patience`` is read the other way, as a sign that
the last step taken before it moved the weights where every batch's gradient explodes (on the deep
recipe's one measured burst the weights before that step exploded too). That step is undone
(:class:`fasthvae.training.rewind.StepRewind`) instead of the burst's gradient being taken, and the
streak starts again; a second streak that reaches ``patience`` before any step is taken is a change
of scale, and goes on as without ``rewind``.

The window lives on the training device and the decision is a device tensor (:meth:`allows_tensor`),
so a step can be skipped or taken without the host waiting for the GPU.
"""

import torch

SKIP_PATIENCE = 5  # threshold skips in a row after which the new scale is accepted


class AdaptiveSkip:
    """``skip = AdaptiveSkip(factor=10)``; ``skip.allows(norm)`` is True when the step may be taken."""

    def __init__(
        self,
        factor: float,
        window: int = 200,
        warmup: int = 20,
        patience: int = SKIP_PATIENCE,
        rewind: bool = False,
        device="cpu",
    ) -> None:
        if factor <= 1:
            raise ValueError(f"the skip factor must be above 1 (a multiple of the median), got {factor}")
        self.factor, self.window, self.warmup, self.patience = factor, window, warmup, patience
        self.rewind = rewind
        # Finite norms above the threshold in a row, up to the last one (non-finite ones keep it).
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        # A ring of the last finite norms (NaN: empty slot), its next slot and its fill, in float64.
        self.norms = torch.full((window,), float("nan"), dtype=torch.float64, device=device)
        self.next = torch.zeros((), dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_t = torch.zeros((), dtype=torch.int64, device=device)
        # Rewinds so far, and whether one happened since the last step taken.
        self.rewinds_t = torch.zeros((), dtype=torch.int64, device=device)
        self.rewound = torch.zeros((), dtype=torch.bool, device=device)

    @property
    def skipped(self) -> int:
        return int(self.skipped_t)

    @property
    def rewinds(self) -> int:
        return int(self.rewinds_t)

    def threshold_tensor(self) -> torch.Tensor:
        """The largest norm a step may have now (inf during the warm-up), on the device."""
        median = torch.nanquantile(self.norms, 0.5)  # the mean of the middle two, as statistics.median
        return torch.where(self.count < self.warmup, torch.inf, self.factor * median)

    def threshold(self) -> float:
        return float(self.threshold_tensor())

    def allows_tensor(self, norm: torch.Tensor) -> torch.Tensor:
        """Whether a step of gradient norm ``norm`` (a device scalar) may be taken, as a device bool;
        records the norm."""
        return self.decide_tensor(norm)[0]

    def decide_tensor(self, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(taken, rewind) for a step of gradient norm ``norm`` (a device scalar), as device bools:
        whether it may be taken, and whether the last step taken must be undone (never both);
        records the norm."""
        norm = norm.to(torch.float64)
        finite = torch.isfinite(norm)
        above = finite & (norm > self.threshold_tensor())
        at_patience = above & (self.streak >= self.patience)
        # Only as the streak reaches the patience: an accepted change of scale goes on after it.
        rewind = above & (self.streak == self.patience) & ~self.rewound & self.rewind
        ok = finite & (~above | (at_patience & ~rewind))  # False for NaN and inf
        streak = torch.where(above, self.streak + 1, torch.where(finite, 0, self.streak))
        self.streak.copy_(torch.where(rewind, 0, streak))
        self.rewound.copy_(~ok & (self.rewound | rewind))
        self.rewinds_t += rewind
        slot = self.next.view(1)
        self.norms.index_copy_(0, slot, torch.where(finite, norm, self.norms.index_select(0, slot)))
        self.next.copy_((self.next + finite) % self.window)
        self.count.copy_(torch.clamp(self.count + finite, max=self.window))
        self.skipped_t += ~ok
        return ok, rewind

    def allows(self, norm: float) -> bool:
        return bool(self.allows_tensor(torch.tensor(norm, device=self.norms.device)))

    def state_dict(self) -> dict:
        """The window oldest first, as plain floats (the format checkpoints have always had)."""
        order = (self.next - self.count + torch.arange(self.window, device=self.norms.device)) % self.window
        ordered = self.norms[order[: int(self.count)]]
        return {
            "norms": ordered.tolist(),
            "skipped": self.skipped,
            "streak": int(self.streak),
            "rewinds": self.rewinds,
            "rewound": bool(self.rewound),
        }

    def load_state_dict(self, state: dict) -> None:
        norms = state["norms"][-self.window :]
        self.norms.fill_(float("nan"))
        if norms:
            self.norms[: len(norms)] = torch.tensor(norms, dtype=torch.float64)
        self.count.fill_(len(norms))
        self.next.fill_(len(norms) % self.window)
        self.skipped_t.fill_(state["skipped"])
        self.streak.fill_(state.get("streak", 0))  # older checkpoints have none
        self.rewinds_t.fill_(state.get("rewinds", 0))
        self.rewound.fill_(state.get("rewound", False))
