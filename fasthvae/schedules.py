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
``staggered``   the alpha-beta idea across a hierarchy of L levels (level 0 the top, the coarsest;
                level L-1 the finest): level l with f = l / (L - 1) follows
                w_f(t) = 0                                          for t < 10 f
                       = (t - 10 f) / (20 + 10 f)                   up to the peak at 20 + 20 f
                       = 1                                          until 30 + 10 f
                       = floor_f + (1 - floor_f) * (1 + cos(pi * (t - 30 - 10 f) / (E - 30 - 10 f))) / 2
                with floor_f = 0.4 - 0.15 f, held at floor_f after E. Each anchor moves linearly
                from the beta curve (f = 0) to the alpha curve (f = 1): the top level follows beta,
                the finest follows alpha, and each level between ramps later, peaks later and ends
                lower. With L = 2 (the HVAE: z2, then z1) ``staggered`` is ``alpha-beta``.

The learning rate has a schedule of its own (``lr_factor``), over the same stretched length:
``constant`` keeps ``--lr``; ``cosine`` multiplies it by (1 + cos(pi * epoch / total_epochs)) / 2,
from 1 at the start to 0 at the end (a usual recipe for a run whose length is fixed in advance).
A warm-up of W epochs (``--lr-warmup``) multiplies either by min(1, epoch / W): a linear ramp from 0.

A KL warm-up of W epochs (``--kl-warmup``, NVAE's remedy for groups that collapse early) multiplies
every level's weight by min(1, epoch / W): a linear ramp from 0, after which the schedule is as above.

Models weight their KLs by level (:meth:`Schedule.level_weights`): the VAE has one level, the HVAE
two (z2 on top, z1 below), the deep model one per resolution. ``beta`` puts beta on every level;
``alpha-beta`` puts beta on the top level and alpha on every level below it. For the VAE, whose
only KL is its top level, ``beta``, ``alpha-beta`` and ``staggered`` coincide.
"""

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "beta", "alpha-beta", "staggered")
LR_SCHEDULES = ("constant", "cosine")
REFERENCE_EPOCHS = 100
BETA_RAMP_END, BETA_HOLD_END, BETA_FLOOR = 20.0, 30.0, 0.4
ALPHA_RAMP_START, ALPHA_PEAK, ALPHA_FLOOR = 10.0, 40.0, 0.25


def _cosine_decay(t: float, start: float, end: float, floor: float) -> float:
    progress = min(max((t - start) / (end - start), 0.0), 1.0)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def warm_up(epoch: float, warmup: float) -> float:
    """min(1, epoch / warmup): the linear ramp from 0 of ``--lr-warmup`` and ``--kl-warmup`` (1
    throughout when ``warmup`` is 0)."""
    return min(epoch / warmup, 1.0) if warmup > 0 else 1.0


def _lerp(a: float, b: float, f: float) -> float:
    return a + (b - a) * f


def staggered_curve(t: float, f: float) -> float:
    """The weight at (reference) epoch t of a level at depth fraction f in [0, 1]: beta at 0, alpha at 1."""
    start = _lerp(0.0, ALPHA_RAMP_START, f)
    peak = _lerp(BETA_RAMP_END, ALPHA_PEAK, f)
    hold_end = _lerp(BETA_HOLD_END, ALPHA_PEAK, f)
    floor = _lerp(BETA_FLOOR, ALPHA_FLOOR, f)
    if t < start:
        return 0.0
    if t < peak:
        return (t - start) / (peak - start)
    if t < hold_end:
        return 1.0
    return _cosine_decay(t, hold_end, REFERENCE_EPOCHS, floor)


def beta_curve(t: float) -> float:
    """The study's beta at (reference) epoch t."""
    return staggered_curve(t, 0.0)


def alpha_curve(t: float) -> float:
    """The staggered alpha at (reference) epoch t: later ramp, peak at 40, floor 0.25."""
    return staggered_curve(t, 1.0)


@dataclass(frozen=True)
class Schedule:
    """``weights(epoch)`` -> (alpha, beta) at a fractional epoch of a ``total_epochs`` run, ramped
    from 0 over the first ``warmup`` epochs (not stretched)."""

    name: str
    total_epochs: float = REFERENCE_EPOCHS
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_epochs <= 0:
            raise ValueError(f"total_epochs must be positive, got {self.total_epochs}")
        if not self.warmup >= 0:
            raise ValueError(f"the KL warm-up must be >= 0 epochs, got {self.warmup}")

    def _t(self, epoch: float) -> float:
        return epoch * REFERENCE_EPOCHS / self.total_epochs

    def weights(self, epoch: float) -> tuple[float, float]:
        """(alpha, beta): the weights of the finest and the top level of a two-level model."""
        top, below = self.level_weights(epoch, 2)
        return below, top

    def level_weights(self, epoch: float, levels: int) -> list[float]:
        """The KL weight of each of ``levels`` levels, the top (coarsest) first."""
        if levels < 1:
            raise ValueError(f"levels must be positive, got {levels}")
        ramp = warm_up(epoch, self.warmup)
        return [ramp * w for w in self._scheduled(epoch, levels)]

    def warming_up(self, epoch: float) -> bool:
        """Whether the KL warm-up still ramps at ``epoch`` (where ``--kl-balance`` acts)."""
        return warm_up(epoch, self.warmup) < 1.0

    def _scheduled(self, epoch: float, levels: int) -> list[float]:
        if self.name == "constant":
            return [1.0] * levels
        t = self._t(epoch)
        if self.name == "beta":
            return [beta_curve(t)] * levels
        if self.name == "alpha-beta":
            return [beta_curve(t)] + [alpha_curve(t)] * (levels - 1)
        return [staggered_curve(t, level / max(levels - 1, 1)) for level in range(levels)]


def lr_factor(name: str, epoch: float, total_epochs: float, warmup: float = 0.0) -> float:
    """The factor on ``--lr`` at a fractional epoch of a ``total_epochs`` schedule with a linear
    warm-up over the first ``warmup`` epochs (module doc); ``cosine`` stays at 0 after the end."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}")
    ramp = warm_up(epoch, warmup)
    if name == "constant":
        return ramp
    progress = min(max(epoch / total_epochs, 0.0), 1.0)
    return ramp * (1 + math.cos(math.pi * progress)) / 2
