"""Update skipping with a threshold that follows the run's own gradient norms.

A fixed skip threshold (VDVAE's) can stall a run whose gradient norms drift above it: every step is
skipped from then on. Here a step is skipped when its gradient norm is not finite or exceeds
``factor`` times the median of the last ``window`` finite norms. Skipped norms enter the window too,
so a lasting change of scale moves the median and is accepted within ``window / 2`` steps, while a
lone spike does not move it. The first ``warmup`` norms only skip on non-finite values.
"""

import math
import statistics
from collections import deque


class AdaptiveSkip:
    """``skip = AdaptiveSkip(factor=10)``; ``skip.allows(norm)`` is True when the step may be taken."""

    def __init__(self, factor: float, window: int = 200, warmup: int = 20) -> None:
        if factor <= 1:
            raise ValueError(f"the skip factor must be above 1 (a multiple of the median), got {factor}")
        self.factor, self.warmup = factor, warmup
        self.norms: deque[float] = deque(maxlen=window)
        self.skipped = 0

    def threshold(self) -> float:
        """The largest norm a step may have now."""
        if len(self.norms) < self.warmup:
            return math.inf
        return self.factor * statistics.median(self.norms)

    def allows(self, norm: float) -> bool:
        limit = self.threshold()
        if math.isfinite(norm):
            self.norms.append(norm)
        ok = norm <= limit  # False for NaN and inf
        self.skipped += not ok
        return ok

    def state_dict(self) -> dict:
        return {"norms": list(self.norms), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(state["norms"])
        self.skipped = state["skipped"]
