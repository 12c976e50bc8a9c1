"""Training images/s: the study's plain PyTorch loop against fasthvae's path, and each speed feature
switched on alone, same model and batch, in one process.

Variants (all through the trainer's own step):
- ``plain``: eager, unfused KL and sampling (plain PyTorch ops), torch DataLoader with workers
- ``+fused-ops``, ``+compile``, ``+amp``, ``+loader``, ``+channels-last``, ``+fused-adamw``: plain plus
  one feature
- ``fasthvae``: the trainer's defaults for this device with ``--amp`` (the README's main command)
Each variant runs ``--warmup`` steps (compilation included), then ``--steps`` timed steps; the median
of ``--repeats`` timed windows gives images/s. One more window under ``torch.profiler`` gives the
fused ops' share of the step (self time of the ``fasthvae::`` ops over all ops; for variants with
the fused ops). Compiled variants also report the compile time (the first step's time less a
timed step's) and dynamo's graph breaks (0: the whole step is one graph, as ``fullgraph=True``
demands). Writes ``train_<device>_<model>.{csv,md}``.

    python bench/bench_train.py [--model hvae|vae|deep] [--preset small] [--batch-size 128]
                                [--device cpu|cuda]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fasthvae.env import machine
from fasthvae.ops import use_backend
from fasthvae.train import TrainConfig, Trainer
from report import write_report

PLAIN = {"compile": False, "amp": False, "loader": "torch", "channels_last": False, "fused_optimizer": False}
FEATURES = {
    "+fused-ops": {},
    "+compile": {"compile": True},
    "+amp": {"amp": True},
    "+loader": {"loader": "resident"},
    "+channels-last": {"channels_last": True},
    "+fused-adamw": {"fused_optimizer": True},
}


def variants(device: str) -> dict[str, tuple[dict, bool]]:
    """name -> (config overrides, fused ops on)."""
    table = {"plain": (PLAIN, False)}
    for name, change in FEATURES.items():
        table[name] = ({**PLAIN, **change}, name == "+fused-ops")
    defaults = {k: None for k in ("compile", "channels_last", "fused_optimizer", "loader")}
    table["fasthvae"] = ({**defaults, "amp": True}, True)  # python -m fasthvae.train --amp
    return table


def ops_share(profile: torch.profiler.profile, device: str) -> float:
    """Share of the profiled self time spent in fasthvae's ops (device time on CUDA)."""
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = profile.key_averages()
    total = sum(getattr(e, attr) for e in events)
    ours = sum(getattr(e, attr) for e in events if e.key.startswith("fasthvae::"))
    return ours / total if total else 0.0


def time_variant(
    config: TrainConfig, fused_ops: bool, warmup: int, steps: int, repeats: int
) -> tuple[list[float], float | None, float, int]:
    """Seconds per window of ``steps`` training steps (data loading included), the fused ops' share
    of a profiled window (None without them), the first step's seconds and dynamo's graph breaks."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with use_backend("auto" if fused_ops else "reference"):
        trainer = Trainer(config)
        weights = torch.ones(trainer.model.num_levels, device=trainer.rt.device)

        def batches():
            epoch = 0
            while True:
                trainer.loader.set_epoch(epoch)
                yield from (x for x, _ in trainer.loader)
                epoch += 1

        stream = batches()
        sync = torch.cuda.synchronize if trainer.rt.device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        trainer.step_fn(next(stream), weights)
        sync()
        first_step = time.perf_counter() - start
        for _ in range(warmup - 1):
            trainer.step_fn(next(stream), weights)
        sync()
        graph_breaks = sum(counters["graph_break"].values())
        windows = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step_fn(next(stream), weights)
            sync()
            windows.append(time.perf_counter() - start)
        share = None
        if fused_ops:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.rt.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as profile:
                for _ in range(steps):
                    trainer.step_fn(next(stream), weights)
                sync()
            share = ops_share(profile, trainer.rt.device.type)
        compiled = trainer.rt.compile
    return windows, share, first_step, graph_breaks if compiled else -1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="hvae", choices=["vae", "hvae", "deep"])
    parser.add_argument("--preset", default="small", help="deep: the preset")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=None, help="CIFAR-10 .npz or folder (default: $FASTHVAE_DATA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, at least 1 (compiles)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles)")

    rows = []
    name_suffix = f"_{args.preset}" if args.model == "deep" else ""
    for name, (overrides, fused_ops) in variants(args.device).items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(
                model=args.model,
                preset=args.preset,
                batch_size=args.batch_size,
                device=args.device,
                data=args.data,
                limit_train=20 * args.batch_size,
                out=tmp,
                **overrides,
            )
            windows, share, first_step, breaks = time_variant(
                config, fused_ops, args.warmup, args.steps, args.repeats
            )
        median = statistics.median(windows)
        rows.append(
            {
                "variant": name,
                "model": args.model,
                "device": args.device,
                "batch_size": args.batch_size,
                "step_ms_median": round(1000 * median / args.steps, 2),
                "images_per_s": round(args.steps * args.batch_size / median, 1),
                "fused_ops_share": None if share is None else round(share, 4),
                "compile_s": round(first_step - median / args.steps, 1) if breaks >= 0 else None,
                "graph_breaks": breaks if breaks >= 0 else None,
            }
        )
        print(rows[-1], flush=True)
    base = next((r["images_per_s"] for r in rows if r["variant"] == "plain"), rows[0]["images_per_s"])
    for row in rows:
        row["speedup_vs_plain"] = round(row["images_per_s"] / base, 3)

    header = ["variant", "step ms (median)", "images/s", "vs plain", "fused ops' share of the step"]
    header += ["compile s", "graph breaks"]
    print(
        write_report(
            rows,
            args.out / f"train_{args.device}_{args.model}{name_suffix}",
            header,
            lambda r: [
                r["variant"],
                str(r["step_ms_median"]),
                str(r["images_per_s"]),
                f"{r['speedup_vs_plain']}x",
                "—" if r["fused_ops_share"] is None else f"{100 * r['fused_ops_share']:.1f}%",
                "—" if r["compile_s"] is None else str(r["compile_s"]),
                "—" if r["graph_breaks"] is None else str(r["graph_breaks"]),
            ],
            title=f"Training step, {args.model}{name_suffix}, batch {args.batch_size}, {machine()}",
        )
    )


if __name__ == "__main__":
    main()
