"""The compiled training step at the full batch, before and after one odd-sized batch (an epoch's
last partial batch, which one CPU process trains), with dynamo's automatic dynamic shapes
(``dynamic=None``: the odd batch recompiles the step with a symbolic batch size) and with static
shapes (``dynamic=False``, what the trainer compiles: the odd batch gets a graph of its own).

Per mode, in one process: the first step (compiles), ``--repeats`` windows of ``--steps`` full
batches, one step at ``--odd-batch`` images (recompiles), ``--repeats`` windows again; medians.
Writes ``recompile_<device>_<model>[_<preset>].{csv,md}``.

    python -m bench.bench_recompile [--model deep] [--preset small] [--batch-size 32] [--odd-batch 16]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.report import write_report
from fasthvae.hardware import machine
from fasthvae.train import TrainConfig, Trainer
from fasthvae.training.loop import Objective, Stepper

MODES = {"automatic dynamic (dynamic=None)": None, "static (dynamic=False, the trainer's)": False}


def windows(step, batch: torch.Tensor, steps: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` windows of ``steps`` steps on ``batch``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        times.append(time.perf_counter() - start)
    return times


def measure(config: TrainConfig, dynamic: bool | None, odd: int, steps: int, repeats: int) -> dict:
    """One mode's step times (ms) before and after the odd batch, and its two compile times (s)."""
    torch._dynamo.reset()
    trainer = Trainer(config)  # eager; the step below compiles the same objective as the trainer
    objective = torch.compile(Objective(trainer.model), dynamic=dynamic)
    stepper = Stepper(
        trainer.state, objective, trainer.config, trainer.rt, sync_free=trainer.rt.fused_optimizer
    )
    weights = torch.ones(trainer.model.num_levels, device=trainer.rt.device)
    full = next(iter(trainer.loader))[0]

    def step(x: torch.Tensor) -> None:
        stepper(x, weights)

    start = time.perf_counter()
    step(full)
    first = time.perf_counter() - start
    step(full)
    before = statistics.median(windows(step, full, steps, repeats)) / steps
    start = time.perf_counter()
    step(full[:odd])
    odd_step = time.perf_counter() - start
    step(full)
    after = statistics.median(windows(step, full, steps, repeats)) / steps
    return {
        "first_step_s": round(first, 1),
        "step_ms_before": round(1000 * before, 1),
        "odd_batch_step_s": round(odd_step, 1),
        "step_ms_after": round(1000 * after, 1),
        "after_vs_before": round(after / before, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="deep", choices=["vae", "hvae", "deep"])
    parser.add_argument("--preset", default="small", help="deep: the preset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--odd-batch", type=int, default=16, help="images in the odd batch")
    parser.add_argument("--data", default=None, help="CIFAR-10 .npz or folder (default: $FASTHVAE_DATA)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not 0 < args.odd_batch < args.batch_size:
        parser.error(f"--odd-batch must be in (0, --batch-size), got {args.odd_batch}")

    rows = []
    for name, dynamic in MODES.items():
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(
                model=args.model,
                preset=args.preset,
                batch_size=args.batch_size,
                device="cpu",
                data=args.data,
                limit_train=args.batch_size,
                loader="resident",
                compile=False,
                amp=True,
                out=tmp,
            )
            rows.append({"mode": name, **measure(config, dynamic, args.odd_batch, args.steps, args.repeats)})
        print(rows[-1], flush=True)
    suffix = f"_{args.preset}" if args.model == "deep" else ""
    print(
        write_report(
            rows,
            args.out / f"recompile_cpu_{args.model}{suffix}",
            [
                "compile mode",
                "first step s",
                "step ms before",
                "odd-batch step s",
                "step ms after",
                "after / before",
            ],
            lambda r: [
                r["mode"],
                str(r["first_step_s"]),
                str(r["step_ms_before"]),
                str(r["odd_batch_step_s"]),
                str(r["step_ms_after"]),
                f"{r['after_vs_before']}x",
            ],
            title=f"Compiled step before and after an odd batch of {args.odd_batch}, {args.model}{suffix}, "
            f"batch {args.batch_size}, {machine()}",
            intro=f"Medians of {args.repeats} windows of {args.steps} full-batch steps each side of the odd "
            "batch, one process per mode; data loading not included.",
        )
    )


if __name__ == "__main__":
    main()
