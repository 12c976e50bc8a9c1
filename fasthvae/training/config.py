"""The trainer's configuration: one dataclass whose fields carry their command-line help and what a
resume may do with them; the parser is generated from it, so no option can miss the resume rules.

Resume rules (``on_resume`` of every field):

- ``keep``: defines what is trained; a resumed run takes the checkpoint's value, and an explicitly
  given different value is an error.
- ``epochs``: the checkpoint's unless given; a given value extends or shortens the run.
- ``change``: how and where the run goes (device, loader, evaluation, outputs); a resume takes the
  new value.
"""

import argparse
import math
import types
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any

from fasthvae.data import DEFAULT_LOADER, LOADERS
from fasthvae.fid_extractors import EXTRACTORS, INCEPTION, TINY
from fasthvae.likelihoods import LIKELIHOODS
from fasthvae.models import MODELS, POSTERIORS, PRESETS, deep_spec
from fasthvae.schedules import LR_SCHEDULES, REFERENCE_EPOCHS, SCHEDULES
from fasthvae.training.grad_skip import SKIP_PATIENCE

RESUME_RULES = ("keep", "epochs", "change")

# Defaults that depend on the model (None in TrainConfig): the study's models train as the study
# did; the deep model as VDVAE does (plain ELBO, mixture likelihood, EMA, update skipping).
MODEL_DEFAULTS = {
    "deep": {"schedule": "constant", "likelihood": "mixture", "ema": 0.999, "skip_factor": 10.0},
    "vae": {"schedule": "beta", "likelihood": "bernoulli", "ema": 0.0, "skip_factor": 0.0},
    "hvae": {"schedule": "alpha-beta", "likelihood": "bernoulli", "ema": 0.0, "skip_factor": 0.0},
}


class TrainingError(RuntimeError):
    """Training cannot go on (bad arguments, diverged, no data); the message says why."""


def option(
    default: Any,
    help: str,
    *,
    on_resume: str,
    choices: tuple | list | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field: its default, its ``--help`` text and its resume rule (see the module doc)."""
    if on_resume not in RESUME_RULES:
        raise ValueError(f"on_resume must be one of {RESUME_RULES}, got {on_resume!r}")
    meta = {"help": help, "on_resume": on_resume, "choices": choices, "metavar": metavar, "cli": cli}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    model: str = option("hvae", "the model", on_resume="keep", choices=list(MODELS))
    schedule: str | None = option(
        None,
        "KL weights (default: beta for vae, alpha-beta for hvae, constant for deep)",
        on_resume="keep",
        choices=SCHEDULES,
    )
    likelihood: str | None = option(
        None,
        "bernoulli (BCE, the study's; default for vae and hvae), gaussian (MSE), logistic or mixture "
        "(discretized, bits/dim; mixture is the default for deep)",
        on_resume="keep",
        choices=LIKELIHOODS,
    )
    channels: int = option(32, "vae/hvae: width of the first conv layer", on_resume="keep")
    latent: int = option(128, "vae/hvae: dim of z (VAE) or z2 (HVAE)", on_resume="keep")
    z1_channels: int = option(16, "hvae: channels of the 8x8 latent z1", on_resume="keep")
    preset: str = option("small", "deep: the model size", on_resume="keep", choices=list(PRESETS))
    layout: str | None = option(
        None, 'deep: latent groups top down, e.g. "1x1,4x2,8x3,16x3,32x2"', on_resume="keep"
    )
    width: int | None = option(None, "deep: channels of the residual stream", on_resume="keep")
    zdim: int | None = option(None, "deep: channels of each latent group", on_resume="keep")
    posterior: str = option(
        "absolute",
        "deep: q's cell gives its mean and log-variance (absolute), or offsets from the prior's "
        "(residual, NVAE's residual normal: q follows p as p moves)",
        on_resume="keep",
        choices=list(POSTERIORS),
    )
    epochs: int = option(
        REFERENCE_EPOCHS,
        "epochs; the schedule is stretched to fit (its anchors are for 100)",
        on_resume="epochs",
    )
    batch_size: int = option(128, "per process", on_resume="keep")
    lr: float = option(1e-3, "AdamW learning rate", on_resume="keep")
    lr_schedule: str = option(
        "constant",
        "constant, or cosine: from --lr down to 0 over the epochs the KL schedule is stretched to",
        on_resume="keep",
        choices=LR_SCHEDULES,
    )
    lr_warmup: float = option(
        0.0, "epochs of a linear learning-rate warm-up from 0 (0: none)", on_resume="keep"
    )
    kl_warmup: float = option(
        0.0, "epochs of a linear warm-up of every KL weight from 0 (0: none)", on_resume="keep"
    )
    free_bits: float = option(
        0.0,
        "a floor on each KL term of the training loss, in nats per latent dimension of its group: a "
        "group below it gets no KL gradient (free bits; 0: none; the reported KLs and ELBO stay plain)",
        on_resume="keep",
    )
    kl_balance: bool = option(
        False,
        "while the KL warm-up ramps, scale each group's KL by its KL per latent dimension over the "
        "groups' mean, so a group carrying little is not pushed to nothing (KL balancing, NVAE; needs "
        "--kl-warmup)",
        on_resume="keep",
    )
    weight_decay: float = option(0.0, "AdamW weight decay", on_resume="keep")
    adam_beta2: float = option(
        0.999,
        "AdamW's second-moment rate; a step whose gradient dwarfs the recent ones moves a weight by up "
        "to lr * 0.1 / sqrt(1 - beta2): 3.2 lr at 0.999, 0.32 lr at 0.9 (VDVAE's)",
        on_resume="keep",
    )
    grad_clip: float = option(100.0, "max gradient norm (0: no clipping)", on_resume="keep")
    amp: bool = option(False, "mixed precision (autocast)", on_resume="keep")
    amp_dtype: str = option("bf16", "fp16 uses a GradScaler", on_resume="keep", choices=["bf16", "fp16"])
    compile: bool | None = option(None, "torch.compile the model and loss (default: on)", on_resume="change")
    compile_mode: str = option(
        "default",
        "torch.compile mode; reduce-overhead replays the compiled step as CUDA graphs on CUDA",
        on_resume="change",
        choices=["default", "reduce-overhead", "max-autotune"],
    )
    compile_wrapper: str | None = option(
        None,
        "the code that calls the compiled step's kernels and ops: Inductor's python wrapper, or its cpp "
        "wrapper (no Python between the calls, and without Inductor's size and stride checks of the "
        "ops' outputs: the deep model's CPU step in 0.93-0.97x the time on AMX code, 0.95x on an "
        "AVX2-only CPU, level to 0.97x on a capped one's AVX2 code, its first compile a quarter to "
        "two fifths longer; default: cpp on CPU, python on CUDA, where the cpp wrapper has not run)",
        on_resume="change",
        choices=["python", "cpp"],
    )
    fused_optimizer: bool | None = option(None, "fused AdamW (default: on)", on_resume="change")
    channels_last: bool | None = option(None, "channels_last memory format (default: on)", on_resume="change")
    onednn_conv: bool | None = option(
        None,
        "the deep model's convolutions on oneDNN's primitives called directly, not through ATen, "
        "each with the GELU before it in one op that keeps the GELU's derivative (CPU; needs the "
        "onednn extra: pip install -e '.[onednn]'; default: on where it can run)",
        on_resume="change",
    )
    keep_freed_memory: bool = option(
        True,
        "keep freed CPU tensors' memory in the process for the next step (glibc's malloc thresholds "
        "raised) instead of returning it to the OS and faulting it in again",
        on_resume="change",
    )
    speed: str = option(
        "auto",
        "auto: --compile, --channels-last, --fused-optimizer, --onednn-conv and --loader, where not "
        "given, chosen by a short probe on this machine, model and batch (cached in "
        "~/.cache/fasthvae/speed; runs under 2000 steps keep the defaults); fixed: their defaults",
        on_resume="change",
        choices=["auto", "fixed"],
    )
    loader: str | None = option(None, f"default: {DEFAULT_LOADER}", on_resume="change", choices=LOADERS)
    workers: int = option(2, "torch DataLoader workers / DALI threads", on_resume="change")
    flip: bool = option(True, "random horizontal flips", on_resume="keep")
    data: str | None = option(
        None,
        "an .npz (x_train/y_train/x_test/y_test), a cifar-10-batches-py folder or an image folder; "
        "default $FASTHVAE_DATA or CIFAR-10 downloaded into --data-root",
        on_resume="keep",
    )
    data_root: str = option("data", "where CIFAR-10 is downloaded to", on_resume="change")
    limit_train: int | None = option(None, "train on the first N images", on_resume="keep", metavar="N")
    limit_test: int | None = option(
        None, "evaluate on the first N test images", on_resume="change", metavar="N"
    )
    out: str = option("runs/latest", "the run folder", on_resume="change")
    resume: bool = option(False, "continue from OUT/checkpoint.pt", on_resume="change")
    overwrite: bool = option(False, "start afresh even if OUT holds a checkpoint", on_resume="change")
    seed: int = option(0, "seeds the weights, the data order and the noise", on_resume="keep")
    device: str | None = option(
        None, "default: cuda when present", on_resume="change", choices=["cpu", "cuda"]
    )
    max_skips: int = option(
        20,
        "stop after this many consecutive skipped steps (non-finite, or above the skip threshold)",
        on_resume="change",
    )
    skip_factor: float | None = option(
        None,
        "skip a step whose gradient norm exceeds this many times the median of the recent ones, "
        f"unless the {SKIP_PATIENCE} steps before it did too (a lasting change of scale goes on) "
        "(0: skip only non-finite steps; default 10 for deep, 0 otherwise)",
        on_resume="keep",
    )
    skip_rewind: bool = option(
        False,
        f"when {SKIP_PATIENCE} steps in a row are skipped above the threshold, undo the last step taken "
        "before them (weights and optimizer state) instead of taking the next one; a second such "
        "burst before any step is taken goes on as a change of scale (needs --skip-factor)",
        on_resume="keep",
    )
    ema: float | None = option(
        None,
        "EMA rate of the weights used for evaluation and samples (0: off; default 0.999 for deep)",
        on_resume="keep",
    )
    iw_samples: int = option(0, "importance samples for the final bound (0: skip)", on_resume="change")
    fid_samples: int = option(0, "FID of N samples at the end (0: skip)", on_resume="change", metavar="N")
    fid_extractor: str = option(
        INCEPTION,
        f"FID features; {TINY} is a tiny fixed extractor for tests (numbers not comparable)",
        on_resume="change",
        choices=list(EXTRACTORS),
    )
    fid_weights: str | None = option(
        None, "Inception weights (default: see docs/evaluation.md)", on_resume="change"
    )
    schedule_epochs: int | None = option(
        None, "the length the schedule is stretched to (None: epochs)", on_resume="keep", cli=False
    )
    time_limit: float | None = option(
        None,
        "minutes of training: stop before an epoch that would pass it (judged by the last epoch's "
        "time); the schedule keeps its --epochs length",
        on_resume="change",
    )
    test_every_epoch: int = option(
        0,
        "after every epoch, the -ELBO (bits/dim where discrete) of the first N test images, plotted "
        "against training time in test_curve.png (0: off)",
        on_resume="change",
        metavar="N",
    )
    checkpoint_every: float | None = option(
        None,
        "also save a mid-epoch checkpoint every this many minutes (SIGTERM and SIGINT always save one)",
        on_resume="change",
        metavar="MINUTES",
    )
    log_every: int | None = option(
        None,
        "steps between reads of the steps' values by the host: progress bar, TensorBoard, skip forensics, "
        "signals, periodic checkpoints (default: 1 on CPU, where a read costs nothing; 25 on CUDA, where "
        "each read waits for the GPU)",
        on_resume="change",
        metavar="STEPS",
    )
    tensorboard: bool | None = option(
        None,
        "TensorBoard event files in the run folder (default: on when the tensorboard package is installed)",
        on_resume="change",
    )


def _base_type(f: Field) -> type:
    """``int`` for ``int | None`` and so on."""
    if isinstance(f.type, types.UnionType):
        return next(t for t in f.type.__args__ if t is not type(None))
    return f.type


def add_options(
    parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None, defaults: dict | None = None
) -> None:
    """Add the options of TrainConfig's fields ``names`` (default: every command-line field) to
    ``parser``, with their help, choices and types; ``defaults`` overrides some defaults (a command
    with a protocol of its own, such as the study's)."""
    chosen = [f for f in fields(TrainConfig) if f.metadata["cli"] and (names is None or f.name in names)]
    for f in chosen:
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        kind = _base_type(f)
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"]
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=default,
                choices=meta["choices"],
                metavar=meta["metavar"],
                help=meta["help"],
            )


def build_parser(
    prog: str = "python -m fasthvae.train", description: str | None = None
) -> argparse.ArgumentParser:
    """The command line of :class:`TrainConfig`, one option per field."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_options(p)
    return p


def options_page() -> str:
    """docs/options.md: every option of ``python -m fasthvae.train``, its default and resume rule."""
    lines = [
        "# Training options",
        "",
        "Generated from `fasthvae.training.config.TrainConfig` by `python -m fasthvae.training.config`;",
        "a test keeps this page equal to it. Resume rules: **keep** defines what is trained (a resumed",
        "run takes the checkpoint's value; a different given value is an error), **epochs** the",
        "checkpoint's unless given, **change** takes the new value.",
        "",
        "| option | default | on resume | what |",
        "|---|---|---|---|",
    ]
    for f in fields(TrainConfig):
        meta = f.metadata
        if not meta["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        if _base_type(f) is bool:
            flag += f" / --no-{f.name.replace('_', '-')}"
        elif meta["choices"]:
            flag += " " + "\\|".join(map(str, meta["choices"]))
        elif meta["metavar"]:
            flag += f" {meta['metavar']}"
        default = "—" if f.default is None else f"`{f.default}`"
        what = meta["help"].replace("|", "\\|")
        lines.append(f"| `{flag}` | {default} | {meta['on_resume']} | {what} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def given_options(argv: list[str] | None = None) -> set[str]:
    """The config fields that ``argv`` sets explicitly (a resume tells them from defaults)."""
    p = build_parser()
    for action in p._actions:  # a SUPPRESS default leaves an option that is not given out
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def changed_from_defaults(config: TrainConfig) -> set[str]:
    """The fields of ``config`` that differ from the defaults (the explicit ones, in Python use)."""
    defaults = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}


def with_model_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with its model's defaults in the fields left at None (see MODEL_DEFAULTS)."""
    if config.model not in MODEL_DEFAULTS:
        raise TrainingError(f"unknown model {config.model!r}; choose one of {', '.join(MODEL_DEFAULTS)}")
    defaults = MODEL_DEFAULTS[config.model]
    return replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def merge_resumed(config: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """A resumed run trains what the checkpoint ``saved`` trained (see the module doc).

    A given ``epochs`` (not below the epochs done) extends or shortens the run while the schedule
    keeps the length it was stretched to, so added epochs train at its final weights.
    """
    before = saved["config"]
    merged = asdict(config)
    for f in fields(TrainConfig):
        if f.metadata["on_resume"] != "keep":
            continue
        default = f.default if f.default is not MISSING else None
        value = before.get(f.name, default)  # older checkpoints lack newer fields
        asked = getattr(config, f.name)
        if f.name in given and asked is not None and asked != value:  # None: the model's default
            raise TrainingError(
                f"--{f.name.replace('_', '-')} {asked} differs from the checkpoint's "
                f"{value}; a resumed run keeps what it trained with (use a new --out to change it)"
            )
        merged[f.name] = value
    merged["schedule_epochs"] = before.get("schedule_epochs") or before["epochs"]
    merged["epochs"] = before["epochs"]
    if "epochs" in given and config.epochs != before["epochs"]:
        if config.epochs < saved["epoch"]:
            raise TrainingError(
                f"--epochs {config.epochs} is below the {saved['epoch']} epochs the checkpoint has done"
            )
        if merged["lr_schedule"] == "cosine" and config.epochs > merged["schedule_epochs"]:
            raise TrainingError(
                f"--epochs {config.epochs} goes past the cosine learning rate's end (epoch "
                f"{merged['schedule_epochs']}), where it is 0: the added epochs would not train; start "
                f"a new run (another --out) with --epochs {config.epochs}"
            )
        merged["epochs"] = config.epochs
        print(
            f"fasthvae.train: the run goes on to {config.epochs} epochs (it was {before['epochs']}); "
            f"the schedule keeps its {merged['schedule_epochs']}-epoch length and holds its final "
            "weights after it",
            flush=True,
        )
    return TrainConfig(**merged)


def validate(config: TrainConfig) -> None:
    """Clear errors for values no run can use (``config`` has its model defaults filled in)."""
    positive = (
        "epochs",
        "batch_size",
        "channels",
        "latent",
        "z1_channels",
        "max_skips",
        "width",
        "zdim",
        "log_every",
    )
    for name in positive:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in (
        "lr",
        "lr_warmup",
        "kl_warmup",
        "free_bits",
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
    for name in ("time_limit", "checkpoint_every"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive minutes, got {value}")
    if not 0 < config.adam_beta2 < 1:
        raise TrainingError(f"--adam-beta2 must be in (0, 1), got {config.adam_beta2}")
    if not 0 <= config.ema < 1:
        raise TrainingError(f"--ema must be in [0, 1), got {config.ema}")
    if config.skip_factor != 0 and not config.skip_factor > 1:
        raise TrainingError(f"--skip-factor must be 0 (off) or above 1, got {config.skip_factor}")
    if config.skip_rewind and not config.skip_factor:
        raise TrainingError("--skip-rewind acts on skips above the threshold: give --skip-factor above 1 too")
    if config.kl_balance and not config.kl_warmup:
        raise TrainingError("--kl-balance acts while the KL warm-up ramps: give --kl-warmup EPOCHS too")
    if config.model == "deep":
        try:
            deep_spec(asdict(config))
        except ValueError as err:
            raise TrainingError(str(err)) from err


if __name__ == "__main__":
    print(options_page(), end="")
