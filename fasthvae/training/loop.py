"""The training loop: one optimizer step, and one epoch (resumable mid-way) of them."""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from fasthvae.data import BatchLoader
from fasthvae.schedules import Schedule
from fasthvae.training import forensics
from fasthvae.training.config import TrainConfig, TrainingError
from fasthvae.training.distributed import DistInfo, all_reduce_sum
from fasthvae.training.precision import autocast
from fasthvae.training.runtime import Runtime
from fasthvae.training.state import EpochProgress, TrainState


class Objective(nn.Module):
    """``model.loss`` as a module, so DDP sees the forward pass and torch.compile takes it whole."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(x, weights)


@dataclass
class StepResult:
    terms: dict[str, torch.Tensor]  # loss, recon and each KL (detached, float32)
    grad_norm: torch.Tensor
    taken: bool
    skip: dict | None  # the forensics record of a skipped step


class Stepper:
    """Takes (or skips) one optimizer step of ``objective`` on a batch."""

    def __init__(self, state: TrainState, objective: nn.Module, config: TrainConfig, rt: Runtime) -> None:
        self.state, self.objective, self.config, self.rt = state, objective, config, rt
        self.term_order = ["recon", *state.model.kl_levels]

    def __call__(self, x: torch.Tensor, weights: list[float]) -> StepResult:
        """Skipped (None ``terms`` taken) when the loss or gradients are non-finite or the gradient
        norm is above the adaptive threshold. Gradients are all-reduced under DDP, so every rank
        sees the same norm and decides alike."""
        s = self.state
        with autocast(self.rt.device.type, self.rt.amp_dtype):
            terms = self.objective(x, torch.tensor(weights, device=self.rt.device))
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(terms["loss"]).backward()
        s.scaler.unscale_(s.optimizer)
        max_norm = self.config.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), max_norm)
        taken = s.skip.allows(float(norm)) if s.skip else bool(torch.isfinite(norm))
        terms = {k: v.detach().float() for k, v in terms.items()}
        record = None
        if taken:
            s.scaler.step(s.optimizer)
            if s.ema is not None:
                s.ema.update(s.model)
        else:
            record = forensics.diagnose(
                terms,
                self.term_order,
                s.model,
                float(norm),
                s.skip.threshold() if s.skip else None,
                float(s.scaler.get_scale()) if s.scaler.is_enabled() else None,
            )
        s.scaler.update()
        return StepResult(terms, norm.detach(), taken, record)


@dataclass
class StopRequest:
    """The loop saved a mid-epoch checkpoint and must stop (a signal)."""

    batch: int


def run_epoch(
    state: TrainState,
    step: Stepper,
    loader: BatchLoader,
    schedule: Schedule,
    config: TrainConfig,
    dist: DistInfo,
    skips: forensics.SkipLog,
    poll: Callable[[], tuple[bool, bool]],
    save: Callable[[], None],
    on_step: Callable[[StepResult, list[float], float], None] | None = None,
) -> dict | StopRequest:
    """Train ``state.epoch`` from ``state.progress`` on; the epoch's metrics row, or a StopRequest
    once ``poll()`` says stop (after saving). ``poll() -> (save, stop)`` runs after every step;
    ``on_step(result, weights, images_per_s)`` too (rank 0)."""
    model, levels = state.model, state.model.num_levels
    model.train()
    p = state.progress
    n_batches = len(loader)
    names = ["loss", "recon", *model.kl_levels]
    device = next(model.parameters()).device
    if p.sums is None:
        p.sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # + images, skips
    sums = p.sums.to(device)
    loader.set_epoch(state.epoch, start_batch=p.batch)
    start = time.perf_counter() - p.seconds
    bar = tqdm(
        total=n_batches,
        initial=p.batch,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        disable=not dist.is_main,
        leave=False,
        dynamic_ncols=True,
    )
    first = p.batch
    for i, (x, _) in enumerate(loader, start=first):
        weights = schedule.level_weights(state.epoch + i / n_batches, levels)
        result = step(x, weights)
        state.step += 1
        bar.update(1)
        if result.taken:
            p.consecutive_skips = 0
            skips.took_step()
            sums[: len(names)] += torch.stack([result.terms[k] for k in names]).double() * len(x)
            sums[-2] += len(x)
        else:
            p.consecutive_skips += 1
            sums[-1] += 1
            skips.add({"epoch": state.epoch + 1, "step": state.step, "weights": weights, **result.skip})
            if p.consecutive_skips >= config.max_skips:
                raise TrainingError(too_many_skips(state, config, skips))
        elapsed = time.perf_counter() - start
        images_per_s = (i + 1 - first) * len(x) * dist.world_size / max(elapsed - p.seconds, 1e-9)
        if on_step is not None and dist.is_main:
            on_step(result, weights, images_per_s)
        if dist.is_main and result.taken and (i % 10 == 0 or i == n_batches - 1):
            epochs_left = config.epochs - state.epoch - (i + 1) / n_batches
            bar.set_postfix(
                loss=f"{float(result.terms['loss']):.1f}",
                img_s=f"{images_per_s:.0f}",
                run_eta=_minutes(epochs_left * elapsed / ((i + 1) / n_batches)),
            )
        if i + 1 < n_batches:
            want_save, stop = poll()
            if want_save:
                p.batch, p.sums, p.seconds = i + 1, sums.cpu(), time.perf_counter() - start
                save()
                if stop:
                    bar.close()
                    return StopRequest(batch=i + 1)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    all_reduce_sum(sums, dist)
    state.progress = EpochProgress()
    return epoch_row(state, schedule, names, sums, seconds)


def epoch_row(
    state: TrainState, schedule: Schedule, names: list[str], sums: torch.Tensor, seconds: float
) -> dict:
    """The epoch's line of metrics.csv: per-image means of the taken steps, weights, speed, skips."""
    levels = state.model.num_levels
    images, skipped = float(sums[-2]), int(sums[-1])
    row: dict = {"epoch": state.epoch + 1}
    row.update({k: float(sums[j]) / max(images, 1) for j, k in enumerate(names)})
    weights = schedule.level_weights(state.epoch + 1, levels)
    row.update({"alpha": weights[-1], "beta": weights[0]})  # the finest and the top level
    if levels > 2:
        row.update({f"weight_level{level}": w for level, w in enumerate(weights)})
    row.update({"images_per_s": images / seconds, "seconds": seconds, "skipped_steps": skipped})
    return row


def too_many_skips(state: TrainState, config: TrainConfig, skips: forensics.SkipLog) -> str:
    threshold = f" (skip threshold now {state.skip.threshold():.4g})" if state.skip else ""
    return (
        f"{config.max_skips} consecutive skipped steps{threshold} at epoch {state.epoch + 1}, step "
        f"{state.step}: training stopped. Likely cause: {forensics.likely_cause(skips.recent)}. The last "
        f"good checkpoint (epoch {state.epoch}) is intact; skips.jsonl has every skipped step."
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 60 else f"{seconds:.0f}s"
