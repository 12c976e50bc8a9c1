"""Latent health: per latent group its KL and active units, warnings for collapse and dominance.

A latent dimension is *active* when its KL to the prior, averaged over images, exceeds
``ACTIVE_KL`` nats (the usual count of Burda et al. uses the variance of the posterior mean; the
average KL is what the training objective pays and needs one pass). A group *collapses* when it
has no active unit for ``patience`` epochs in a row; one group *dominates* when it carries more than
``DOMINANT_SHARE`` of the total KL.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fasthvae.models import LatentVariableModel
from fasthvae.training.precision import autocast

ACTIVE_KL = 0.01
DOMINANT_SHARE = 0.5


@torch.no_grad()
def measure(model: LatentVariableModel, x: Tensor, amp_dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Per KL term: mean KL (nats per image), active units and latent dims, on the images ``x``."""
    was_training = model.training
    model.eval()
    with autocast(x.device.type, amp_dtype):
        kls = model(x, kl_reduction="none").kls
    model.train(was_training)
    health = {}
    for name, kl in kls.items():
        per_dim = kl.float().mean(0)  # average over images
        health[name] = {
            "kl": float(per_dim.sum()),
            "active": int((per_dim > ACTIVE_KL).sum()),
            "dims": per_dim.numel(),
        }
    return health


def dominant_group(health: dict[str, dict]) -> str | None:
    """The group carrying more than ``DOMINANT_SHARE`` of the total KL, if one does."""
    total = sum(h["kl"] for h in health.values())
    if len(health) < 2 or total <= 0:
        return None
    name = max(health, key=lambda n: health[n]["kl"])
    return name if health[name]["kl"] / total > DOMINANT_SHARE else None


@dataclass
class HealthMonitor:
    """Keeps the epochs' measures and says when a group collapses or one group dominates."""

    patience: int = 3
    history: list[dict[str, dict]] = field(default_factory=list)
    warned_collapsed: set[str] = field(default_factory=set)

    def add(self, health: dict[str, dict]) -> list[str]:
        """Record one epoch; return its new warnings (a condition is reported when it starts)."""
        previous_dominant = dominant_group(self.history[-1]) if self.history else None
        self.history.append(health)
        collapsed = set(self.collapsed())
        warnings = [
            f"latent group {name} has collapsed: no active units (KL > {ACTIVE_KL} nats per dim) for "
            f"{self.patience} epochs"
            for name in health
            if name in collapsed - self.warned_collapsed
        ]
        self.warned_collapsed = collapsed
        dominant = dominant_group(health)
        if dominant is not None and dominant != previous_dominant:
            total = sum(h["kl"] for h in health.values())
            warnings.append(
                f"latent group {dominant} carries {health[dominant]['kl'] / total:.0%} of the KL "
                f"({health[dominant]['kl']:.1f} of {total:.1f} nats): the other groups are barely used"
            )
        return warnings

    def collapsed(self) -> list[str]:
        """Groups with no active unit in each of the last ``patience`` epochs."""
        if len(self.history) < self.patience:
            return []
        recent = self.history[-self.patience :]
        return [n for n in self.history[-1] if not any(h[n]["active"] for h in recent)]

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.warned_collapsed = set(self.collapsed())

    def summary(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {
            "active_kl_nats": ACTIVE_KL,
            "groups": last,
            "active_units": sum(h["active"] for h in last.values()),
            "latent_dims": sum(h["dims"] for h in last.values()),
            "collapsed": self.collapsed(),
            "dominant": dominant_group(last),
        }


def save_heatmap(history: list[dict[str, dict]], path: Path) -> None:
    """KL per group (rows, top group first) over epochs (columns), and active units per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(history[0])
    kl = torch.tensor([[h[n]["kl"] for h in history] for n in names])
    active = [history[-1][n]["active"] / history[-1][n]["dims"] for n in names]
    fig, (ax0, ax1) = plt.subplots(
        1, 2, figsize=(12, 1.2 + 0.3 * len(names)), gridspec_kw={"width_ratios": [3, 1]}, squeeze=True
    )
    image = ax0.imshow(
        torch.log10(kl.clamp(min=1e-3)), aspect="auto", cmap="viridis", interpolation="nearest"
    )
    ax0.set_yticks(range(len(names)), names)
    ax0.set_xticks(range(len(history)), [str(i + 1) for i in range(len(history))])
    ax0.set_xlabel("epoch")
    ax0.set_title("KL per latent group (log10 nats / image)")
    fig.colorbar(image, ax=ax0)
    ax1.barh(range(len(names)), active)
    ax1.set_yticks(range(len(names)), [])
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1)
    ax1.set_title("active units, last epoch (share)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
