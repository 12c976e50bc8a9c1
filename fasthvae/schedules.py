"""KL weight schedules of the study, evaluated at a fractional epoch (smooth within an epoch).

Anchors are epochs of a 100-epoch run; ``total_epochs`` stretches them (factor total_epochs / 100).
With t the (stretched) epoch and E = 100 the end of the schedule:

``beta``        beta(t)  = t / 20                                   for t < 20
                         = 1                                        for 20 <= t < 30
                         = 0.4 + 0.6 * (1 + cos(pi * (t - 30) / (E - 30))) / 2   for 30 <= t <= E
                (a half-cosine from 1 down to 0.4 at the end), held at 0.4 after E.
                alpha(t) = beta(t): one weight on every KL term.
``alpha-beta``  beta(t) as above, on KL(q(z2) || N(0, I)); alpha on the middle term
                KL(q(z1) || p(z1 | z2)) ramps later and peaks at epoch 40:
                alpha(t) = 0                                        for t < 10
                         = (t - 10) / 30                            for 10 <= t < 40
                         = 0.25 + 0.75 * (1 + cos(pi * (t - 40) / (E - 40))) / 2 for 40 <= t <= E
                (down to a floor of 0.25), held at 0.25 after E.
``constant``    alpha = beta = 1.

For the VAE, whose only KL is weighted by beta, ``beta`` and ``alpha-beta`` coincide.
"""

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "beta", "alpha-beta")
REFERENCE_EPOCHS = 100
BETA_RAMP_END, BETA_HOLD_END, BETA_FLOOR = 20.0, 30.0, 0.4
ALPHA_RAMP_START, ALPHA_PEAK, ALPHA_FLOOR = 10.0, 40.0, 0.25


def _cosine_decay(t: float, start: float, end: float, floor: float) -> float:
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def beta_curve(t: float) -> float:
    """The study's beta at (reference) epoch t."""
    if t < BETA_RAMP_END:
        return max(t, 0.0) / BETA_RAMP_END
    if t < BETA_HOLD_END:
        return 1.0
    return _cosine_decay(t, BETA_HOLD_END, REFERENCE_EPOCHS, BETA_FLOOR)


def alpha_curve(t: float) -> float:
    """The staggered alpha at (reference) epoch t: later ramp, peak at 40, floor 0.25."""
    if t < ALPHA_RAMP_START:
        return 0.0
    if t < ALPHA_PEAK:
        return (t - ALPHA_RAMP_START) / (ALPHA_PEAK - ALPHA_RAMP_START)
    return _cosine_decay(t, ALPHA_PEAK, REFERENCE_EPOCHS, ALPHA_FLOOR)


@dataclass(frozen=True)
class Schedule:
    """``weights(epoch)`` -> (alpha, beta) at a fractional epoch of a ``total_epochs`` run."""

    name: str
    total_epochs: float = REFERENCE_EPOCHS

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_epochs <= 0:
            raise ValueError(f"total_epochs must be positive, got {self.total_epochs}")

    def weights(self, epoch: float) -> tuple[float, float]:
        if self.name == "constant":
            return 1.0, 1.0
        t = epoch * REFERENCE_EPOCHS / self.total_epochs
        beta = beta_curve(t)
        alpha = alpha_curve(t) if self.name == "alpha-beta" else beta
        return alpha, beta
