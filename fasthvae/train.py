"""Train the study's VAE or two-level HVAE, or the deep top-down HVAE, on CIFAR-10.

    python -m fasthvae.train --amp                       # HVAE, alpha-beta schedule, 100 epochs
    python -m fasthvae.train --model vae --schedule beta --epochs 30 --data cifar10.npz
    python -m fasthvae.train --model deep --preset small # deep HVAE, mixture likelihood, plain ELBO
    torchrun --nproc_per_node 2 -m fasthvae.train ...    # DDP: each rank its shard, rank 0 writes

Leaves in --out: config.json, metrics.csv, checkpoint.pt (atomic, every epoch; --resume continues
from it), samples.png, reconstructions.png, loss_curves.png, latent_health.png and summary.json.
"""

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fasthvae.data import (
    LOADERS,
    DataError,
    LoaderOptions,
    default_loader,
    image_batches,
    load_dataset,
    make_loader,
)
from fasthvae.data.sources import DATA_ENV
from fasthvae.eval.fid import INCEPTION, TINY, FidError, model_fid
from fasthvae.eval.metrics import evaluate_model
from fasthvae.likelihoods import LIKELIHOODS
from fasthvae.models import MODELS, PRESETS, build_model_from_config, deep_spec
from fasthvae.schedules import REFERENCE_EPOCHS, SCHEDULES, Schedule
from fasthvae.training import latent_health, plots
from fasthvae.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_atomic,
    write_text_atomic,
)
from fasthvae.training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from fasthvae.training.ema import EMA
from fasthvae.training.grad_skip import AdaptiveSkip
from fasthvae.training.precision import autocast, choose_amp_dtype, grad_scaler

# Fields that define what is trained; a resumed run must not change them.
IDENTITY = (
    "model",
    "schedule",
    "likelihood",
    "channels",
    "latent",
    "z1_channels",
    "preset",
    "layout",
    "width",
    "zdim",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "data",
    "limit_train",
    "flip",
    "amp",
    "amp_dtype",
    "grad_clip",
    "skip_factor",
    "ema",
)
# Defaults that depend on the model (None in TrainConfig): the study's models train as the study
# did; the deep model as VDVAE does (plain ELBO, mixture likelihood, EMA, update skipping).
MODEL_DEFAULTS = {
    "deep": {"schedule": "constant", "likelihood": "mixture", "ema": 0.999, "skip_factor": 10.0},
    "vae": {"schedule": "beta", "likelihood": "bernoulli", "ema": 0.0, "skip_factor": 0.0},
    "hvae": {"schedule": "alpha-beta", "likelihood": "bernoulli", "ema": 0.0, "skip_factor": 0.0},
}


HEALTH_IMAGES = 256  # test images on which each epoch counts active units


class TrainingError(RuntimeError):
    """Training cannot go on (bad arguments, diverged, no data); the message says why."""


@dataclass
class TrainConfig:
    model: str = "hvae"
    schedule: str | None = None  # None: MODEL_DEFAULTS
    likelihood: str | None = None
    channels: int = 32
    latent: int = 128
    z1_channels: int = 16
    preset: str = "small"
    layout: str | None = None
    width: int | None = None
    zdim: int | None = None
    epochs: int = REFERENCE_EPOCHS
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 100.0
    amp: bool = False
    amp_dtype: str = "bf16"
    compile: bool | None = None  # None: on (measured to help on CPU too: see README)
    fused_optimizer: bool | None = None  # None: on for CUDA, off for CPU (measured)
    channels_last: bool | None = None  # None: on
    loader: str | None = None
    workers: int = 2
    flip: bool = True
    data: str | None = None
    data_root: str = "data"
    limit_train: int | None = None
    limit_test: int | None = None
    out: str = "runs/latest"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str | None = None
    max_skips: int = 20
    skip_factor: float | None = None
    ema: float | None = None
    iw_samples: int = 0
    fid_samples: int = 0
    fid_extractor: str = INCEPTION
    fid_weights: str | None = None
    schedule_epochs: int | None = None  # the length the schedule is stretched to (None: epochs)
    time_limit: float | None = None  # minutes of training; no epoch is begun that would pass it
    test_every_epoch: int = 0  # test images whose -ELBO is measured after every epoch (0: none)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fasthvae.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=list(MODELS), default="hvae")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="KL weights (default: beta for vae, alpha-beta for hvae, constant for deep)",
    )
    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default=None,
        help="bernoulli (BCE, the study's; default for vae and hvae), gaussian (MSE), logistic or "
        "mixture (discretized, bits/dim; mixture is the default for deep)",
    )
    p.add_argument("--channels", type=int, default=32, help="vae/hvae: width of the first conv layer")
    p.add_argument("--latent", type=int, default=128, help="vae/hvae: dim of z (VAE) or z2 (HVAE)")
    p.add_argument("--z1-channels", type=int, default=16, help="hvae: channels of the 8x8 latent z1")
    p.add_argument("--preset", choices=list(PRESETS), default="small", help="deep: the model size")
    p.add_argument(
        "--layout", default=None, help='deep: latent groups top down, e.g. "1x1,4x2,8x3,16x3,32x2"'
    )
    p.add_argument("--width", type=int, default=None, help="deep: channels of the residual stream")
    p.add_argument("--zdim", type=int, default=None, help="deep: channels of each latent group")
    p.add_argument(
        "--epochs",
        type=int,
        default=REFERENCE_EPOCHS,
        help="epochs; the schedule is stretched to fit (its anchors are for 100)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=100.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    p.add_argument("--amp-dtype", choices=["bf16", "fp16"], default="bf16", help="fp16 uses a GradScaler")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model and loss (default: on)",
    )
    p.add_argument(
        "--fused-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused AdamW (default: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on)",
    )
    p.add_argument("--loader", choices=LOADERS, default=None, help="default: resident on CUDA, torch on CPU")
    p.add_argument("--workers", type=int, default=2, help="torch DataLoader workers / DALI threads")
    p.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips"
    )
    p.add_argument(
        "--data",
        default=None,
        help="an .npz (x_train/y_train/x_test/y_test), a cifar-10-batches-py folder or an image "
        "folder; default $FASTHVAE_DATA or CIFAR-10 downloaded into --data-root",
    )
    p.add_argument("--data-root", default="data")
    p.add_argument("--limit-train", type=int, default=None, help="train on the first N images")
    p.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--out", default="runs/latest")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if OUT holds a checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    p.add_argument(
        "--max-skips",
        type=int,
        default=20,
        help="stop after this many consecutive skipped steps (non-finite, or above the skip threshold)",
    )
    p.add_argument(
        "--skip-factor",
        type=float,
        default=None,
        help="skip a step whose gradient norm exceeds this many times the median of the recent ones "
        "(0: skip only non-finite steps; default 10 for deep, 0 otherwise)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        help="EMA rate of the weights used for evaluation and samples (0: off; default 0.999 for deep)",
    )
    p.add_argument(
        "--iw-samples", type=int, default=0, help="importance samples for the final bound (0: skip)"
    )
    p.add_argument("--fid-samples", type=int, default=0, help="FID of N samples at the end (0: skip)")
    p.add_argument(
        "--fid-extractor",
        choices=[INCEPTION, TINY],
        default=INCEPTION,
        help=f"FID features; {TINY} is a tiny fixed extractor for tests (numbers not comparable)",
    )
    p.add_argument("--fid-weights", default=None, help="Inception weights (default: see README, Evaluation)")
    p.add_argument(
        "--test-every-epoch",
        type=int,
        default=0,
        metavar="N",
        help="after every epoch, the -ELBO (bits/dim where discrete) of the first N test images, "
        "plotted against training time in test_curve.png (0: off)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="minutes of training: stop before an epoch that would pass it (judged by the last epoch's "
        "time); the schedule keeps its --epochs length",
    )
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(_parser().parse_args(argv)))


def with_model_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with its model's defaults in the fields left at None (see MODEL_DEFAULTS)."""
    if config.model not in MODEL_DEFAULTS:
        raise TrainingError(f"unknown model {config.model!r}; choose one of {', '.join(MODEL_DEFAULTS)}")
    defaults = MODEL_DEFAULTS[config.model]
    return replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def given_options(argv: list[str] | None = None) -> set[str]:
    """The config fields that ``argv`` sets explicitly (a resume tells them from defaults)."""
    p = _parser()
    for action in p._actions:  # a SUPPRESS default leaves an option that is not given out
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def changed_from_defaults(config: TrainConfig) -> set[str]:
    """The fields of ``config`` that differ from the defaults (the explicit ones, in Python use)."""
    defaults = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}


def merge_resumed(config: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """A resumed run trains what the checkpoint ``saved`` trained.

    Identity fields come from the checkpoint, and ``given`` (explicitly set) values that differ
    are an error. ``epochs`` stays the checkpoint's unless given: a different value (not below the
    epochs done) extends or shortens the run while the schedule keeps the length it was stretched
    to, so added epochs train at its final weights. Runtime fields (device, loader, compile, ...)
    come from ``config``.
    """
    defaults, before = TrainConfig(), saved["config"]
    merged = asdict(config)
    for name in IDENTITY:
        value = before.get(name, getattr(defaults, name))  # older checkpoints lack newer fields
        asked = getattr(config, name)
        if name in given and asked is not None and asked != value:  # None: the model's default
            raise TrainingError(
                f"--{name.replace('_', '-')} {asked} differs from the checkpoint's "
                f"{value}; a resumed run keeps what it trained with (use a new --out to change it)"
            )
        merged[name] = value
    merged["schedule_epochs"] = before.get("schedule_epochs") or before["epochs"]
    merged["epochs"] = before["epochs"]
    if "epochs" in given and config.epochs != before["epochs"]:
        if config.epochs < saved["epoch"]:
            raise TrainingError(
                f"--epochs {config.epochs} is below the {saved['epoch']} epochs the checkpoint has done"
            )
        merged["epochs"] = config.epochs
        print(
            f"fasthvae.train: the run goes on to {config.epochs} epochs (it was {before['epochs']}); "
            f"the schedule keeps its {merged['schedule_epochs']}-epoch length and holds its final "
            "weights after it",
            flush=True,
        )
    return TrainConfig(**merged)


@dataclass(frozen=True)
class Runtime:
    """Per-device choices resolved from the config (the defaults were picked by measurement)."""

    device: torch.device
    amp_dtype: torch.dtype | None
    amp_fallback: str | None  # why --amp trains in fp32 here (a CPU without native bf16/fp16)
    compile: bool
    fused_optimizer: bool
    channels_last: bool
    loader: str


def device_type(config: TrainConfig) -> str:
    """``cuda`` or ``cpu``: --device, else CUDA when torch sees a GPU."""
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but torch sees no GPU")
    return name


def resolve_runtime(config: TrainConfig, dist: DistInfo) -> Runtime:
    name = device_type(config)
    device = torch.device("cuda", dist.local_rank) if name == "cuda" else torch.device("cpu")
    on_gpu = device.type == "cuda"

    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    # CPU defaults measured with bench/bench_train.py: see the README.
    amp_dtype, amp_fallback = choose_amp_dtype(config.amp, config.amp_dtype, device)
    return Runtime(
        device=device,
        amp_dtype=amp_dtype,
        amp_fallback=amp_fallback,
        compile=pick(config.compile, True),
        fused_optimizer=pick(config.fused_optimizer, on_gpu),
        channels_last=pick(config.channels_last, True),
        loader=config.loader or default_loader(device),
    )


def validate(config: TrainConfig) -> None:
    """Clear errors for values no run can use (``config`` has its model defaults filled in)."""
    positive = ("epochs", "batch_size", "channels", "latent", "z1_channels", "max_skips", "width", "zdim")
    for name in positive:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in (
        "lr",
        "weight_decay",
        "grad_clip",
        "workers",
        "iw_samples",
        "fid_samples",
        "test_every_epoch",
    ):
        if getattr(config, name) < 0 or not math.isfinite(getattr(config, name)):
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if config.lr == 0:
        raise TrainingError("--lr must be positive")
    if config.time_limit is not None and not config.time_limit > 0:
        raise TrainingError(f"--time-limit must be positive minutes, got {config.time_limit}")
    if not 0 <= config.ema < 1:
        raise TrainingError(f"--ema must be in [0, 1), got {config.ema}")
    if config.skip_factor != 0 and not config.skip_factor > 1:
        raise TrainingError(f"--skip-factor must be 0 (off) or above 1, got {config.skip_factor}")
    if config.model == "deep":
        try:
            deep_spec(asdict(config))
        except ValueError as err:
            raise TrainingError(str(err)) from err


class Objective(nn.Module):
    """``model.loss`` as a module, so DDP sees the forward pass and torch.compile takes it whole."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(x, weights)


class Trainer:
    """Holds the run's state; ``run()`` trains to ``config.epochs`` and returns the summary."""

    def __init__(self, config: TrainConfig, given: set[str] | None = None) -> None:
        """``given``: the fields set explicitly (default: those that differ from the defaults)."""
        if config.data is None and os.environ.get(DATA_ENV):  # record where the data came from
            config = replace(config, data=os.environ[DATA_ENV])
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        saved = None
        if config.resume:
            saved = load_checkpoint(self.checkpoint_path)
            given = changed_from_defaults(config) if given is None else given
            config = merge_resumed(config, saved, given)
        elif self.checkpoint_path.exists() and not config.overwrite:
            raise TrainingError(
                f"{self.out} already holds a checkpoint: pass --resume to continue it, "
                "--overwrite to start afresh, or another --out"
            )
        config = with_model_defaults(config)
        validate(config)
        self.config = config
        self.dist = init_distributed(device_type(config))  # NCCL on GPUs, gloo on CPU
        self.rt = resolve_runtime(config, self.dist)
        torch.manual_seed(config.seed + self.dist.rank)
        if self.rt.device.type == "cuda":
            torch.cuda.set_device(self.rt.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

        data = load_dataset(config.data, root=config.data_root)
        self.train_split = data.train.limit(config.limit_train)
        self.test_split = data.test.limit(config.limit_test)
        self.data_source = data.source
        options = LoaderOptions(
            batch_size=config.batch_size,
            flip=config.flip,
            seed=config.seed,
            drop_last=self.dist.enabled,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            channels_last=self.rt.channels_last,
        )
        self.loader = make_loader(
            self.rt.loader, self.train_split.images, options, self.rt.device, num_workers=config.workers
        )
        if len(self.loader) == 0:
            raise TrainingError(
                f"{len(self.train_split)} training images give no batch of {config.batch_size}"
                f" on {self.dist.world_size} process(es)"
            )

        self.model = build_model_from_config(asdict(config)).to(self.rt.device)
        if self.rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=self.rt.fused_optimizer,
        )
        self.scaler = grad_scaler(self.rt.device, self.rt.amp_dtype)
        self.schedule = Schedule(config.schedule, config.schedule_epochs or config.epochs)
        self.ema = EMA(self.model, config.ema) if config.ema else None
        self.eval_model = self.ema.model if self.ema else self.model  # what evaluation and samples use
        self.skip = AdaptiveSkip(config.skip_factor) if config.skip_factor else None
        self.health = latent_health.HealthMonitor()
        self.epoch, self.step, self.history = 0, 0, []
        if saved is not None:
            self._restore(saved)

        objective: nn.Module = Objective(self.model)
        if self.dist.enabled:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        self.objective = torch.compile(objective) if self.rt.compile else objective
        self.fixed_batch = next(image_batches(self.test_split.images[:32], self.rt.device, 32))
        health_images = self.test_split.images[:HEALTH_IMAGES]
        self.health_batch = next(image_batches(health_images, self.rt.device, len(health_images)))

    # ---- state

    def _restore(self, saved: dict) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{self.checkpoint_path}: does not fit this model ({err})") from err
        self.scaler.load_state_dict(saved["scaler"])
        for name, part in (("ema", self.ema), ("skip", self.skip), ("health", self.health)):
            if part is not None and saved.get(name) is not None:
                part.load_state_dict(saved[name])
        self.epoch, self.step, self.history = saved["epoch"], saved["step"], saved["history"]
        restore_rng_states(
            saved["rng"][self.dist.rank] if self.dist.rank < len(saved["rng"]) else saved["rng"][0]
        )

    def _save(self) -> None:
        rng = [rng_states()]
        if self.dist.enabled:  # every rank's RNG, so a resumed DDP run draws the same noise
            rng = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rng, rng_states())
        if not self.dist.is_main:
            return
        save_atomic(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "skip": self.skip.state_dict() if self.skip else None,
                "health": self.health.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "history": self.history,
                "config": asdict(self.config),
                "rng": rng,
            },
            self.checkpoint_path,
        )

    # ---- training

    def _train_step(self, x: torch.Tensor, weights: list[float]) -> dict[str, torch.Tensor] | None:
        """One optimizer step with the KL weights per level; None when it was skipped (non-finite
        loss or gradients, or a gradient norm above the adaptive threshold)."""
        with autocast(self.rt.device.type, self.rt.amp_dtype):
            terms = self.objective(x, torch.tensor(weights, device=self.rt.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # Gradients are all-reduced, so every rank sees the same norm and decides alike.
        take = self.skip.allows(float(norm)) if self.skip else bool(torch.isfinite(norm))
        if take:
            self.scaler.step(self.optimizer)
            if self.ema is not None:
                self.ema.update(self.model)
        self.scaler.update()
        return {k: v.detach().float() for k, v in terms.items()} if take else None

    def _run_epoch(self) -> dict[str, float]:
        self.model.train()
        self.loader.set_epoch(self.epoch)
        n_batches = len(self.loader)
        names = ["loss", "recon", *self.model.kl_levels]
        levels = self.model.num_levels
        sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=self.rt.device)  # + images, skips
        consecutive_skips = 0
        start = time.perf_counter()
        bar = tqdm(
            total=n_batches,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            disable=not self.dist.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        for i, (x, _) in enumerate(self.loader):
            terms = self._train_step(x, self.schedule.level_weights(self.epoch + i / n_batches, levels))
            self.step += 1
            if terms is None:
                bar.update(1)
                consecutive_skips += 1
                sums[-1] += 1
                if consecutive_skips >= self.config.max_skips:
                    threshold = f" (skip threshold now {self.skip.threshold():.4g})" if self.skip else ""
                    raise TrainingError(
                        f"{consecutive_skips} consecutive skipped steps (non-finite loss or gradients, or "
                        f"gradient norms above the adaptive threshold{threshold}) at epoch "
                        f"{self.epoch + 1}, step {self.step}: training stopped. The last good checkpoint "
                        f"({self.checkpoint_path}, epoch {self.epoch}) is intact; try a lower --lr, "
                        "--grad-clip, --amp-dtype bf16 or a larger --skip-factor."
                    )
                continue
            consecutive_skips = 0
            sums[: len(names)] += torch.stack([terms[k] for k in names]).double() * len(x)
            sums[-2] += len(x)
            if self.dist.is_main and (i % 10 == 0 or i == n_batches - 1):
                elapsed = time.perf_counter() - start
                epochs_left = self.config.epochs - self.epoch - (i + 1) / n_batches
                bar.set_postfix(
                    loss=f"{float(terms['loss']):.1f}",
                    img_s=f"{(i + 1) * len(x) * self.dist.world_size / elapsed:.0f}",
                    run_eta=_minutes(epochs_left * elapsed / ((i + 1) / n_batches)),
                )
            bar.update(1)
        bar.close()
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        all_reduce_sum(sums, self.dist)
        images, skipped = float(sums[-2]), int(sums[-1])
        row = {"epoch": self.epoch + 1}
        row.update({k: float(sums[j]) / max(images, 1) for j, k in enumerate(names)})
        weights = self.schedule.level_weights(self.epoch + 1, levels)
        row.update({"alpha": weights[-1], "beta": weights[0]})  # the finest and the top level
        if levels > 2:
            row.update({f"weight_level{level}": w for level, w in enumerate(weights)})
        row.update(
            {
                "images_per_s": images / seconds,
                "seconds": seconds,
                "skipped_steps": skipped,
            }
        )
        return row

    def _check_latents(self, row: dict) -> None:
        """Into the epoch's row: the test -ELBO when asked, active units per latent group; warnings
        when groups collapse or one carries most of the KL (rank 0, first test images, evaluation
        weights)."""
        if self.config.test_every_epoch:
            images = self.test_split.images[: self.config.test_every_epoch]
            test = evaluate_model(
                self.eval_model, image_batches(images, self.rt.device, 500), autocast_dtype=self.rt.amp_dtype
            )
            row["test_neg_elbo"] = test["neg_elbo"]
            if "neg_elbo_bits_per_dim" in test:
                row["test_bits_per_dim"] = test["neg_elbo_bits_per_dim"]
        health = latent_health.measure(self.eval_model, self.health_batch, self.rt.amp_dtype)
        row.update({f"active_{name.removeprefix('kl_')}": h["active"] for name, h in health.items()})
        for warning in self.health.add(health):
            print(f"fasthvae.train: warning: epoch {self.epoch + 1}: {warning}", file=sys.stderr, flush=True)

    def _write_outputs(self) -> None:
        """metrics.csv, sample and reconstruction grids, loss curves, latent health (rank 0)."""
        buf = io.StringIO()
        # A run resumed under a newer trainer may log columns its first epochs lack.
        columns = list(dict.fromkeys(key for row in self.history for key in row))
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.history)
        write_text_atomic(buf.getvalue(), self.out / "metrics.csv")
        model = self.eval_model
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast(self.rt.device.type, self.rt.amp_dtype):
            plots.save_grid(model.sample(64), self.out / "samples.png")
            recons = model.reconstruct(self.fixed_batch)
        plots.save_reconstructions(self.fixed_batch, recons, self.out / "reconstructions.png")
        model.train(was_training)
        plots.save_loss_curves(self.history, self.out / "loss_curves.png")
        latent_health.save_heatmap(self.health.history, self.out / "latent_health.png")
        if "test_neg_elbo" in self.history[0]:
            plots.save_test_curve(self.history, self.out / "test_curve.png")

    def _out_of_time(self) -> bool:
        """Whether another epoch, as long as the last one, would pass ``--time-limit``."""
        if self.config.time_limit is None or not self.history:
            return False
        spent = sum(r["seconds"] for r in self.history)
        return spent + self.history[-1]["seconds"] > self.config.time_limit * 60

    def summarize(self) -> dict:
        """Test-set measures of the final model, training speed, and FID when asked (rank 0)."""
        start = time.perf_counter()
        metrics = evaluate_model(
            self.eval_model,
            image_batches(self.test_split.images, self.rt.device, 500),
            iw_samples=self.config.iw_samples,
            autocast_dtype=self.rt.amp_dtype,
        )
        if self.config.fid_samples:
            fid = model_fid(
                self.eval_model,
                self.config.fid_samples,
                device=self.rt.device,
                data=self.config.data,
                data_root=self.config.data_root,
                weights=self.config.fid_weights,
                extractor=self.config.fid_extractor,
            )
        summary = {
            "test": metrics,
            "epochs": self.epoch,
            "steps": self.step,
            "train_images": len(self.train_split),
            "data": self.data_source,
            "images_per_s_last_epoch": self.history[-1]["images_per_s"] if self.history else None,
            "train_seconds": sum(r["seconds"] for r in self.history),
            "eval_seconds": time.perf_counter() - start,
            "skipped_steps": sum(r["skipped_steps"] for r in self.history),
            "stopped_by_time_limit": self.epoch < self.config.epochs,
            "evaluated_weights": f"EMA (rate {self.config.ema})" if self.ema else "trained",
            "latent_health": self.health.summary(),
            "runtime": self.runtime_record(),
        }
        if self.config.fid_samples:
            summary["fid"] = fid
        return summary

    def runtime_record(self) -> dict:
        """What this process resolved (device, precision, compile, loader), for config and summary."""
        return {
            "device": str(self.rt.device),
            "compile": self.rt.compile,
            "amp_dtype": str(self.rt.amp_dtype),
            "amp_fallback": self.rt.amp_fallback,
            "channels_last": self.rt.channels_last,
            "loader": self.rt.loader,
            "world_size": self.dist.world_size,
        }

    def run(self, on_epoch: Callable[[dict], None] | None = None) -> dict:
        """Train to ``config.epochs``, then summarize; ``on_epoch(row)`` after each epoch (rank 0)."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            record = asdict(self.config) | {"runtime": self.runtime_record()}
            write_text_atomic(json.dumps(record, indent=2) + "\n", self.out / "config.json")
        while self.epoch < self.config.epochs and not self._out_of_time():
            row = self._run_epoch()
            if self.dist.is_main:
                self._check_latents(row)
            self.epoch += 1
            self.history.append(row)
            if self.dist.is_main:
                print(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
                self._write_outputs()
            self._save()
            if on_epoch is not None and self.dist.is_main:
                on_epoch(row)
            barrier(self.dist)
        summary = {}
        if self.dist.is_main:
            summary = self.summarize()
            write_text_atomic(json.dumps(summary, indent=2) + "\n", self.out / "summary.json")
        barrier(self.dist)
        return summary


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 60 else f"{seconds:.0f}s"


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    trainer = None
    try:
        trainer = Trainer(config, given_options(argv))
        summary = trainer.run()
    except (TrainingError, CheckpointError, DataError, FidError) as err:
        print(f"fasthvae.train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            shutdown(trainer.dist)
    if summary:
        print(json.dumps(summary["test"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
