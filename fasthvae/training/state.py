"""The training state: model, optimizer, scaler, EMA, skip threshold, latent health, counters and the
position inside an unfinished epoch; saved and restored whole, so a resume continues exactly."""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fasthvae.models import build_model_from_config
from fasthvae.nn import use_onednn_conv
from fasthvae.optim import AdamW
from fasthvae.training import latent_health
from fasthvae.training.checkpoint import CheckpointError, restore_rng_states, rng_states, save_atomic
from fasthvae.training.config import TrainConfig
from fasthvae.training.distributed import DistInfo
from fasthvae.training.ema import EMA
from fasthvae.training.grad_skip import SKIP_PATIENCE, AdaptiveSkip
from fasthvae.training.precision import grad_scaler
from fasthvae.training.rewind import StepRewind
from fasthvae.training.runtime import Runtime
from fasthvae.version import __version__


@dataclass
class EpochProgress:
    """How far the current epoch has come: batches done, this rank's running sums of its metrics,
    its seconds so far and the skips in a row (all zero at an epoch's start). In a checkpoint the
    sums are saved per rank."""

    batch: int = 0
    sums: torch.Tensor | None = None
    seconds: float = 0.0
    consecutive_skips: int = 0

    def state_dict(self, rank_sums: list) -> dict:
        return {
            "batch": self.batch,
            "sums": rank_sums,
            "seconds": self.seconds,
            "consecutive_skips": self.consecutive_skips,
        }

    @classmethod
    def from_state_dict(cls, state: dict, rank: int) -> "EpochProgress":
        return cls(state["batch"], state["sums"][rank], state["seconds"], state["consecutive_skips"])


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    skip: AdaptiveSkip | None
    health: latent_health.HealthMonitor
    rewind: StepRewind | None = None  # --skip-rewind
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken or skipped
    history: list[dict] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=EpochProgress)

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation and samples use: the EMA weights when kept."""
        return self.ema.model if self.ema else self.model

    def restore(self, saved: dict, rank: int, path: Path) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: does not fit this model ({err})") from err
        self.scaler.load_state_dict(saved["scaler"])
        parts = (("ema", self.ema), ("skip", self.skip), ("health", self.health), ("rewind", self.rewind))
        for name, part in parts:
            if part is not None and saved.get(name) is not None:
                try:
                    part.load_state_dict(saved[name])
                except (ValueError, KeyError) as err:
                    raise CheckpointError(f"{path}: its {name} state does not fit this run ({err})") from err
        self.epoch, self.step, self.history = saved["epoch"], saved["step"], saved["history"]
        progress = saved.get("progress")
        self.progress = EpochProgress.from_state_dict(progress, rank) if progress else EpochProgress()
        restore_rng_states(saved["rng"][rank] if rank < len(saved["rng"]) else saved["rng"][0])

    def save(self, config: TrainConfig, dist: DistInfo, path: Path) -> None:
        """Atomically to ``path`` (rank 0), with every rank's RNG (so a resumed DDP run draws the same
        noise) and epoch sums. Every rank must call it."""
        sums = None if self.progress.sums is None else self.progress.sums.cpu()
        per_rank = [(rng_states(), sums)]
        if dist.enabled:
            per_rank = [None] * dist.world_size
            torch.distributed.all_gather_object(per_rank, (rng_states(), sums))
        if not dist.is_main:
            return
        rng = [r for r, _ in per_rank]
        save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "skip": self.skip.state_dict() if self.skip else None,
                "health": self.health.state_dict(),
                "rewind": self.rewind.state_dict() if self.rewind else None,
                "epoch": self.epoch,
                "step": self.step,
                "history": self.history,
                "progress": self.progress.state_dict([s for _, s in per_rank])
                if self.progress.batch
                else None,
                "config": asdict(config),
                "rng": rng,
                "fasthvae_version": __version__,
            },
            path,
        )


def adaptive_skip(config: TrainConfig, device: torch.device) -> AdaptiveSkip | None:
    """The update skipping of ``--skip-factor`` on the training device: a lasting change of scale
    goes on after ``SKIP_PATIENCE`` skipped steps, always before ``--max-skips`` would stop the run."""
    if not config.skip_factor:
        return None
    patience = min(SKIP_PATIENCE, config.max_skips - 1)
    return AdaptiveSkip(config.skip_factor, patience=patience, rewind=config.skip_rewind, device=device)


def build_state(config: TrainConfig, rt: Runtime, model: nn.Module | None = None) -> TrainState:
    """A fresh state for ``config`` on the runtime's device; ``model``: one built for ``rt`` before,
    trained by this state's optimizer too (the speed probe's candidates that differ only in it)."""
    if model is None:
        model = build_model_from_config(asdict(config)).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        use_onednn_conv(model, rt.onednn_conv)
    optimizer = AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(0.9, config.adam_beta2),
        weight_decay=config.weight_decay,
        fused=rt.fused_optimizer,
    )
    return TrainState(
        model=model,
        optimizer=optimizer,
        scaler=grad_scaler(rt.device, rt.amp_dtype),
        ema=EMA(model, config.ema) if config.ema else None,
        skip=adaptive_skip(config, rt.device),
        health=latent_health.HealthMonitor(),
        rewind=StepRewind(optimizer) if config.skip_rewind else None,
    )
