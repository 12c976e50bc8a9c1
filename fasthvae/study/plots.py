"""The study's pictures: study.png (every row's curves on shared axes, the schedules underneath),
samples.png (per row a strip of samples and a strip of reconstructions of the same inputs) and
bits_per_dim.png (test bits/dim against training time and against epochs, for the runs that
measured it each epoch)."""

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from fasthvae.data import image_batches
from fasthvae.eval.runs import load_run
from fasthvae.study.runner import Run
from fasthvae.training.plots import training_minutes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_curves(runs: list[Run], path: Path) -> None:
    """Reconstruction, each KL and the loss per epoch for every run; alpha and beta underneath."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(9, 13), sharex=True)
    colors = {}
    for run in [r for r in runs if r.history]:
        color = colors.setdefault(run.row.name, f"C{len(colors)}")
        epochs = [r["epoch"] for r in run.history]
        label = f"{run.row.label}, seed {run.seed}"
        axes[0].plot(epochs, [r["recon"] for r in run.history], color=color, label=label)
        kls = [k for k in run.history[0] if k.startswith("kl_")]
        if len(kls) > 2:  # a deep model: its total KL (latent_health.png in the run shows each group)
            total = [sum(r[k] for k in kls) for r in run.history]
            axes[1].plot(epochs, total, "-.", color=color, label=f"{label}: KL of all {len(kls)} groups")
        else:
            for style, key in zip(("-", "--"), kls, strict=False):
                axes[1].plot(
                    epochs, [r[key] for r in run.history], style, color=color, label=f"{label}: {key}"
                )
        axes[2].plot(epochs, [r["loss"] for r in run.history], color=color, label=label)
        staggered = run.row.config["schedule"] in ("alpha-beta", "staggered")
        weights = ["beta", "alpha"] if staggered else ["beta"]
        for style, key in zip(("-", "--"), weights, strict=False):
            axes[3].plot(
                epochs, [r[key] for r in run.history], style, color=color, label=f"{run.row.label}: {key}"
            )
    titles = (
        "training reconstruction (BCE, nats / image)",
        "training KL terms (nats / image, log scale)",
        "training loss (recon + weighted KLs)",
        "schedule weights at each epoch's end",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7)
    axes[1].set_yscale("log")  # a deep model's free early KL is orders of magnitude above the rest
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bits_per_dim_curve(run: Run) -> list[tuple[float, float, float]]:
    """(training minutes, epoch, test bits/dim) after each epoch of ``run`` that measured it."""
    minutes = training_minutes(run.history)
    return [
        (m, e["epoch"], e["test_bits_per_dim"])
        for m, e in zip(minutes, run.history, strict=True)
        if "test_bits_per_dim" in e
    ]


SEED_STYLES = ("-", ":", "-.")  # a run's line by its seed; the target's is dashed


def bits_per_dim_legend(runs: list[Run], target: float | None) -> list[tuple[str, str, str]]:
    """The picture's key as (label, colour, line style): a colour per row, a line style per seed,
    the target last."""
    rows = list(dict.fromkeys(r.row.label for r in runs))
    seeds = sorted({r.seed for r in runs})
    return (
        [(label, f"C{i}", "-") for i, label in enumerate(rows)]
        + [(f"seed {s}", "black", SEED_STYLES[i % len(SEED_STYLES)]) for i, s in enumerate(seeds)]
        + ([(f"target {target}", "grey", "--")] if target is not None else [])
    )


def save_bits_per_dim(runs: list[Run], path: Path, target: float | None = None) -> bool:
    """Test bits/dim after each epoch (``--test-every-epoch``) against training minutes (left) and
    against epochs (right: the axis that does not depend on the machine's speed), one line per run
    (its row's colour, its seed's line style), ``target`` dashed, the key underneath; False (and no
    file) when no run has such a curve."""
    curves = [r for r in runs if any("test_bits_per_dim" in e for e in r.history)]
    if not curves:
        return False
    plt = _pyplot()
    from matplotlib.lines import Line2D

    legend = bits_per_dim_legend(curves, target)
    style = {label: (color, line) for label, color, line in legend}
    height = 4.5 + 0.22 * len(legend)
    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(13, height), sharey=True)
    for run in curves:
        at_minute, at_epoch, bits = zip(*bits_per_dim_curve(run), strict=True)
        color, line = style[run.row.label][0], style[f"seed {run.seed}"][1]
        for ax, x in ((by_time, at_minute), (by_epoch, at_epoch)):
            ax.plot(x, bits, marker="o", markersize=4, linestyle=line, color=color)
    for ax in (by_time, by_epoch):
        if target is not None:
            ax.axhline(target, linestyle="--", color="grey")
        ax.grid(alpha=0.3)
    by_time.set_xlabel("training time (minutes, evaluation excluded)")
    by_epoch.set_xlabel("epoch")
    by_time.set_ylabel("test bits/dim (-ELBO)")
    handles = [
        Line2D([], [], color=c, linestyle=ls, marker="o" if c != "grey" else None) for _, c, ls in legend
    ]
    fig.legend(handles, [label for label, _, _ in legend], loc="lower center", fontsize=8, frameon=False)
    fig.suptitle("Bits/dim of the test images measured after each epoch")
    fig.tight_layout(rect=(0, 0.22 * len(legend) / height + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@torch.no_grad()
def save_samples(runs: list[Run], test_images: np.ndarray, path: Path, n: int = 10, seed: int = 0) -> None:
    """For each row (its first finished seed): ``n`` samples and ``n`` test inputs over their
    reconstructions, the same inputs for every row."""
    plt = _pyplot()
    firsts: dict[str, Run] = {}
    for run in runs:
        if run.status == "done" and run.measured is None:  # imported runs have no checkpoint here
            firsts.setdefault(run.row.name, run)
    if not firsts:
        return
    inputs = next(image_batches(test_images[:n], "cpu", n))
    fig, axes = plt.subplots(len(firsts), 2, figsize=(14, 1.9 * len(firsts)), squeeze=False)
    for (ax_s, ax_r), run in zip(axes, firsts.values(), strict=True):
        model, _, _ = load_run(run.folder, torch.device("cpu"))
        torch.manual_seed(seed)
        samples = model.sample(n).float().clamp(0, 1)
        recons = model.reconstruct(inputs).float().clamp(0, 1)
        for ax, images, nrow, title in (
            (ax_s, samples, n, "samples"),
            (ax_r, torch.cat([inputs, recons]), n, "test inputs (top), reconstructions (bottom)"),
        ):
            grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
            ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{run.row.label} (seed {run.seed}): {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
