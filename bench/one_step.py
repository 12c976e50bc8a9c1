"""The trainer's step of one model on one batch, as the step benchmarks (``bench_threads``,
``bench_waits``, ``bench_allocator``) build, name and take it from the command line."""

import argparse
from collections.abc import Callable

import torch

from fasthvae.train import TrainConfig, Trainer
from fasthvae.training.runtime import onednn_conv_unavailable


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, batch and data of the step, and whether it is compiled."""
    parser.add_argument("--model", default="deep", choices=["vae", "hvae", "deep"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=None, help="as the trainer's --data")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)


def model_names(args: argparse.Namespace) -> tuple[str, str]:
    """(the model as a table names it, as a file name does): "deep `small`", "deep_small"."""
    if args.model == "deep":
        return f"deep `{args.preset}`", f"deep_{args.preset}"
    return args.model.upper(), args.model


def step_config(args: argparse.Namespace, out: str, fast: bool = True) -> TrainConfig:
    """The step as ``python -m fasthvae.train --amp`` runs it with every speed switch on (compile
    as ``--compile`` says; the deep model's oneDNN convolutions where they can run; freed memory
    kept, the trainer's default); ``fast=False``: plain eager float32."""
    base = TrainConfig(model=args.model, preset=args.preset)
    onednn = onednn_conv_unavailable(base, torch.device("cpu")) is None
    return TrainConfig(
        model=args.model,
        preset=args.preset,
        batch_size=args.batch_size,
        data=args.data,
        limit_train=args.batch_size,
        epochs=1,
        out=out,
        speed="fixed",
        loader="resident",
        amp=fast,
        compile=fast and args.compile,
        channels_last=fast,
        fused_optimizer=fast,
        onednn_conv=fast and onednn,
    )


def one_batch_step(trainer: Trainer) -> tuple[Callable[[], object], int]:
    """The trainer's step on the first batch of its loader, and the batch's size."""
    x, _ = next(iter(trainer.loader))
    weights = torch.ones(trainer.model.num_levels, device=trainer.rt.device)
    return (lambda: trainer.step_fn(x, weights)), len(x)
