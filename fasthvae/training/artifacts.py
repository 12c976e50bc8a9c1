"""What a run leaves in its folder besides the checkpoint: metrics.csv, the PNGs, TensorBoard events.

TensorBoard (``--tensorboard``, on by default when the package is installed): per step the loss,
reconstruction, each KL, the level weights (alpha/beta), the gradient norm, skipped steps so far and
images/s; per epoch the sample and reconstruction grids. A resumed run drops the events written
after its checkpoint's step, so the curves never double back.
"""

import csv
import io
import queue
import threading
from pathlib import Path

import torch
from torch import nn

from fasthvae.training import latent_health, plots
from fasthvae.training.checkpoint import write_text_atomic
from fasthvae.training.precision import autocast


def write_metrics(history: list[dict], path: Path) -> None:
    """metrics.csv, one row per epoch. A run resumed under a newer trainer may log columns its first
    epochs lack: those cells are blank."""
    buf = io.StringIO()
    columns = list(dict.fromkeys(key for row in history for key in row))
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(buf.getvalue(), path)


def model_pictures(
    model: nn.Module, fixed_batch: torch.Tensor, amp_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """64 samples, and the reconstructions of ``fixed_batch``, in evaluation mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(fixed_batch.device.type, amp_dtype):
        samples = model.sample(64)
        recons = model.reconstruct(fixed_batch)
    model.train(was_training)
    return samples.float(), recons.float()


def write_pictures(
    out: Path,
    history: list[dict],
    health_history: list,
    samples: torch.Tensor,
    fixed_batch: torch.Tensor,
    recons: torch.Tensor,
) -> None:
    """samples.png, reconstructions.png, loss_curves.png, latent_health.png, test_curve.png."""
    plots.save_grid(samples, out / "samples.png")
    plots.save_reconstructions(fixed_batch, recons, out / "reconstructions.png")
    plots.save_loss_curves(history, out / "loss_curves.png")
    latent_health.save_heatmap(health_history, out / "latent_health.png")
    if any("test_neg_elbo" in row for row in history):
        plots.save_test_curve([r for r in history if "test_neg_elbo" in r], out / "test_curve.png")


class TensorBoardLog:
    """Event files in the run folder (``tensorboard --logdir runs/`` shows every run).

    The training thread only queues each step's values (read back with the others every
    ``--log-every`` steps); a writer thread turns them into events (building them costs ~1 ms a
    step, too much to spend between GPU steps)."""

    def __init__(self, out: Path, resume_step: int, skipped_so_far: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events a crashed or stopped run wrote after its checkpoint's step are dropped.
        self.writer = SummaryWriter(str(out), purge_step=resume_step + 1 if resume_step else None)
        self.skipped = skipped_so_far
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._write, name="fasthvae-tensorboard", daemon=True)
        self.thread.start()

    def _write(self) -> None:
        while (item := self.queue.get()) is not None:
            kind, step, payload = item
            if kind == "scalars":
                for tag, value in payload:
                    self.writer.add_scalar(tag, value, step)
            elif kind == "flush":
                self.writer.flush()
            else:
                self.writer.add_images(kind, payload, step)

    def step(self, step: int, record: dict, weights: list[float], images_per_s: float) -> None:
        """A step's record (see ``Stepper.record``), read back already: no device access here."""
        self.skipped += not record["taken"]
        scalars = [(f"train/{name}", value) for name, value in record["terms"].items()]
        scalars += [
            ("train/grad_norm", record["grad_norm"]),
            ("train/skipped_steps", self.skipped),
            ("train/images_per_s", images_per_s),
            ("weights/alpha", weights[-1]),
            ("weights/beta", weights[0]),
        ]
        if len(weights) > 2:
            scalars += [(f"weights/level{level}", w) for level, w in enumerate(weights)]
        self.queue.put(("scalars", step, scalars))

    def epoch(self, step: int, row: dict, samples: torch.Tensor, recons: torch.Tensor) -> None:
        self.queue.put(("samples", step, samples.clamp(0, 1).cpu()))
        self.queue.put(("reconstructions", step, recons.clamp(0, 1).cpu()))
        tests = [
            (f"test/{k.removeprefix('test_')}", row[k])
            for k in ("test_neg_elbo", "test_bits_per_dim")
            if k in row
        ]
        self.queue.put(("scalars", step, tests))
        self.queue.put(("flush", step, None))  # the epoch is on disk for a running TensorBoard

    def close(self) -> None:
        """Write what is queued, then close the files."""
        self.queue.put(None)
        self.thread.join()
        self.writer.close()
