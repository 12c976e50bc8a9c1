"""PNGs a person would rather look at than read: image grids and loss curves."""

from pathlib import Path

import torch
from torchvision.utils import save_image


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Images [N, 3, H, W] in [0, 1] as one PNG grid."""
    save_image(images.detach().float().clamp(0, 1).cpu(), path, nrow=nrow, padding=1)


def save_reconstructions(inputs: torch.Tensor, recons: torch.Tensor, path: Path, pairs: int = 32) -> None:
    """Each input next to its reconstruction (input, recon, input, recon, ... along each row)."""
    n = min(pairs, len(inputs))
    both = torch.stack([inputs[:n].float().cpu(), recons[:n].float().cpu()], 1).flatten(0, 1)
    save_grid(both, path, nrow=16)


def save_loss_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss, reconstruction, each KL and the schedule weights per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    kls = [k for k in history[0] if k.startswith("kl_")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "recon"):
        axes[0].plot(epochs, [row[key] for row in history], label=key)
    for key in kls:
        axes[1].plot(epochs, [row[key] for row in history], label=key)
    for key in ("alpha", "beta"):
        axes[2].plot(epochs, [row[key] for row in history], label=key)
    titles = ("loss and reconstruction (nats / image)", "KL terms (nats / image)", "schedule weights")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
