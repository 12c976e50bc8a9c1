"""PNGs a person would rather look at than read: image grids and loss curves."""

import itertools
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


def training_minutes(history: list[dict]) -> list[float]:
    """The training time (minutes, evaluation excluded) at the end of each epoch of ``history``."""
    return [m / 60 for m in itertools.accumulate(row["seconds"] for row in history)]


def save_test_curve(history: list[dict[str, float]], path: Path) -> None:
    """The test -ELBO after each epoch (bits/dim where the likelihood is discrete) against the
    training time so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "test_bits_per_dim" if "test_bits_per_dim" in history[0] else "test_neg_elbo"
    minutes = training_minutes(history)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(minutes, [row[key] for row in history], "o-")
    for row, x in zip(history, minutes, strict=True):
        ax.annotate(f"{row[key]:.3g}", (x, row[key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("test bits/dim (-ELBO)" if key == "test_bits_per_dim" else "test -ELBO (nats / image)")
    ax.set_title("test bound after each epoch")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
