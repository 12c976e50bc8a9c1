"""Training images/s: the study's plain PyTorch loop against fasthvae's path, and each speed feature
switched on alone, same model and batch, in one process.

Variants (all but ``bare`` through the trainer's own step):
- ``bare``: the plain model in a bare eager loop, ``model.loss`` + backward + ``torch.optim.AdamW``
  (no gradient norms, skip decisions, EMA or records): what the trainer's bookkeeping costs
- ``plain``: eager, unfused KL and sampling (plain PyTorch ops), torch DataLoader with workers
- ``+fused-ops``, ``+compile``, ``+amp``, ``+loader``, ``+channels-last``, ``+fused-adamw``: plain plus
  one feature
- ``fasthvae``: the trainer's defaults for this device with ``--amp`` (the README's main command):
  ``--speed auto`` chooses compile, channels_last, the fused AdamW and the loader by its probe (or its cache,
  ``fasthvae/training/speed.py``); the ``switches on`` column shows each row's, and where they came from
Each variant runs ``--warmup`` steps (compilation included), then ``--steps`` timed steps; the median
of ``--repeats`` timed windows gives images/s. One more window under ``torch.profiler`` gives the
fused ops' share of the step (self time of the ``fasthvae::`` ops over all ops; for variants with
the fused ops). Compiled variants also report the compile time (the first step's time less a
timed step's) and dynamo's graph breaks (0: the whole step is one graph, as ``fullgraph=True``
demands). Writes ``train_<device>_<model>.{csv,md}``.

Every row is also on the machine's scale (``bench/machine_scale.py``): the FLOPs of a step per
image (counted once, on the plain variant's eager step: convolutions and matrix products, forward
and backward), the GFLOP/s that makes at the row's speed, and its share of two peaks measured in
the same process before the variants: an fp32 sgemm (2048^2) and the model's commonest
convolution (the conv shape holding most of the step's FLOPs) at the same batch, forward and
backward. ``--model deep`` runs each ``--preset`` given, a table each.

``--top-ops N`` also writes where each variant's step spends its time: the N entries of the profiled
window with the most self time (device time on CUDA), per step and as a share of the window, in
``train_<device>_<model>_top_ops.{csv,md}``, and the window's time by resolution (of each entry's
first 4-D input) in ``train_<device>_<model>_by_resolution.{csv,md}``. Compiled code is named by its
kernels there (on CPU, Inductor's ``cpp.enable_kernel_profile`` is switched on for this, which adds a
record per kernel).

    python -m bench.bench_train [--model hvae|vae|deep] [--preset small [base]] [--batch-size 128]
                                [--device cpu|cuda] [--top-ops 15]
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from bench.machine_scale import (
    ConvShape,
    commonest_conv,
    conv_gflops,
    count_flops,
    device_sync,
    sgemm_gflops,
)
from bench.report import write_report
from fasthvae.hardware import machine
from fasthvae.models import DeepHVAE
from fasthvae.ops import use_backend
from fasthvae.train import TrainConfig, Trainer
from fasthvae.training.speed import PROBE_MIN_STEPS, SWITCHES

PLAIN = {"compile": False, "amp": False, "loader": "torch", "channels_last": False, "fused_optimizer": False}
FEATURES = {
    "+fused-ops": {},
    "+compile": {"compile": True},
    "+amp": {"amp": True},
    "+loader": {"loader": "resident"},
    "+channels-last": {"channels_last": True},
    "+fused-adamw": {"fused_optimizer": True},
}


BARE = "bare"


def variants(device: str) -> dict[str, tuple[dict, bool]]:
    """name -> (config overrides, fused ops on)."""
    table = {BARE: (PLAIN, False), "plain": (PLAIN, False)}
    for name, change in FEATURES.items():
        table[name] = ({**PLAIN, **change}, name == "+fused-ops")
    defaults = {k: None for k in ("compile", "channels_last", "fused_optimizer", "loader")}
    table["fasthvae"] = ({**defaults, "amp": True}, True)  # python -m fasthvae.train --amp
    return table


def self_time(device: str) -> str:
    """The profiler's self-time field that measures ``device``."""
    return "self_device_time_total" if device == "cuda" else "self_cpu_time_total"


def ops_share(profile: torch.profiler.profile, device: str) -> float:
    """Share of the profiled self time spent in fasthvae's ops (device time on CUDA)."""
    attr = self_time(device)
    events = profile.key_averages()
    total = sum(getattr(e, attr) for e in events)
    ours = sum(getattr(e, attr) for e in events if e.key.startswith("fasthvae::"))
    return ours / total if total else 0.0


def top_entries(profile: torch.profiler.profile, device: str, steps: int, count: int) -> list[dict]:
    """The ``count`` profiled entries with the most self time: ms and calls per step, share."""
    attr = self_time(device)
    events = [e for e in profile.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            "name": e.key,
            "self_ms_per_step": round(getattr(e, attr) / 1000 / steps, 3),
            "share": round(getattr(e, attr) / total, 4),
            "calls_per_step": round(e.count / steps, 1),
        }
        for e in events[:count]
    ]


def by_resolution(profile: torch.profiler.profile, device: str, steps: int, batch: int) -> list[dict]:
    """Self time per step by the resolution (H x W) of each entry's first 4-D input of ``batch``
    images, smallest first; entries without one (compiled kernels, the optimizer and other work on
    the weights, autograd's bookkeeping) as ``other``. Needs a profile with ``record_shapes``."""
    attr = self_time(device)
    totals: dict[tuple[int, str], float] = {}
    for event in profile.key_averages(group_by_input_shape=True):
        shape = next((s for s in event.input_shapes if len(s) == 4 and s[0] == batch), None)
        key = (shape[-2] * shape[-1], f"{shape[-2]}x{shape[-1]}") if shape else (1 << 62, "other")
        totals[key] = totals.get(key, 0.0) + getattr(event, attr)
    total = sum(totals.values())
    return [
        {"resolution": name, "self_ms_per_step": round(t / 1000 / steps, 3), "share": round(t / total, 4)}
        for (_, name), t in sorted(totals.items())
        if t > 0
    ]


@dataclass
class Timing:
    """One variant's measurements: seconds per timed window, the fused ops' share of a profiled
    window (None without them), the first step's seconds, dynamo's graph breaks (-1: eager), the
    speed switches the trainer ran with (and how ``--speed`` chose them) and the profiled window's
    top entries (when asked)."""

    windows: list[float]
    share: float | None
    first_step: float
    graph_breaks: int
    switches: str
    top: list[dict] = field(default_factory=list)
    resolutions: list[dict] = field(default_factory=list)


def bare_step(model: torch.nn.Module, lr: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One step of a bare eager loop: ``model.loss``, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(x: torch.Tensor, weights: torch.Tensor) -> None:
        model.loss(x, weights)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_variant(
    config: TrainConfig,
    fused_ops: bool,
    warmup: int,
    steps: int,
    repeats: int,
    top_ops: int = 0,
    bare: bool = False,
) -> Timing:
    """Times ``repeats`` windows of ``steps`` training steps (data loading included) after
    ``warmup`` steps, then profiles one more window when the fused ops' share or ``top_ops``
    entries are asked for. ``bare``: the trainer's model and loader in a bare loop instead of its step."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with use_backend("auto" if fused_ops else "reference"):
        trainer = Trainer(config)
        weights = torch.ones(trainer.model.num_levels, device=trainer.rt.device)
        step = bare_step(trainer.model, config.lr) if bare else trainer.step_fn

        def batches():
            epoch = 0
            while True:
                trainer.loader.set_epoch(epoch)
                yield from (x for x, _ in trainer.loader)
                epoch += 1

        stream = batches()
        sync = device_sync(trainer.rt.device)
        start = time.perf_counter()
        step(next(stream), weights)
        sync()
        first_step = time.perf_counter() - start
        for _ in range(warmup - 1):
            step(next(stream), weights)
        sync()
        graph_breaks = sum(counters["graph_break"].values())
        windows = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                step(next(stream), weights)
            sync()
            windows.append(time.perf_counter() - start)
        share, top, resolutions = None, [], []
        if fused_ops or top_ops:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if trainer.rt.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities, record_shapes=bool(top_ops)) as profile:
                for _ in range(steps):
                    step(next(stream), weights)
                sync()
            share = ops_share(profile, trainer.rt.device.type) if fused_ops else None
            if top_ops:
                top = top_entries(profile, trainer.rt.device.type, steps, top_ops)
                resolutions = by_resolution(profile, trainer.rt.device.type, steps, config.batch_size)
        compiled = trainer.rt.compile
    breaks = graph_breaks if compiled else -1
    return Timing(windows, share, first_step, breaks, switches_of(trainer), top, resolutions)


def switches_of(trainer: Trainer) -> str:
    """The speed switches a trainer runs with, and where ``--speed`` took them from."""
    on = [name for name in SWITCHES if getattr(trainer.rt, name)] + [f"{trainer.rt.loader} loader"]
    return f"{', '.join(on)} ({trainer.speed['source'].split(':')[0]})"


@dataclass
class Scale:
    """The machine's scale of one model and batch: FLOPs per image of a step, the commonest conv,
    and the peaks measured here (GFLOP/s)."""

    flops_per_image: float
    conv: ConvShape
    sgemm_peak: float
    conv_peak: float

    def row(self, images_per_s: float) -> dict:
        gflops = self.flops_per_image * images_per_s / 1e9
        return {
            "mflop_per_image": round(self.flops_per_image / 1e6, 1),
            "gflops": round(gflops, 1),
            "share_of_sgemm": round(gflops / self.sgemm_peak, 3),
            "share_of_conv": round(gflops / self.conv_peak, 3),
        }


def measure_scale(config: TrainConfig, repeats: int) -> Scale:
    """Count the FLOPs of one eager step of ``config`` (plain PyTorch ops) and measure the peaks."""
    torch._dynamo.reset()
    with use_backend("reference"):
        trainer = Trainer(config)
        trainer.loader.set_epoch(0)
        x, _ = next(iter(trainer.loader))
        weights = torch.ones(trainer.model.num_levels, device=trainer.rt.device)
        if isinstance(trainer.model, DeepHVAE):
            trainer.model.heads_as_one = False  # the model's own FLOPs, not the zero blocks
        flops = count_flops(lambda: trainer.step_fn(x, weights))
        conv = commonest_conv(trainer.model, lambda: trainer.model(x))
    device = trainer.rt.device
    sgemm, conv_peak = sgemm_gflops(device, repeats=repeats), conv_gflops(conv, len(x), device, repeats)
    return Scale(flops / len(x), conv, sgemm, conv_peak)


def run_model(args: argparse.Namespace, preset: str) -> None:
    """Every variant of ``args.model`` (``preset`` for deep): its table, and the top ops when asked."""
    rows, top_rows, resolution_rows = [], [], []
    name_suffix = f"_{preset}" if args.model == "deep" else ""

    def config(tmp: str, overrides: dict) -> TrainConfig:
        return TrainConfig(
            model=args.model,
            preset=preset,
            batch_size=args.batch_size,
            device=args.device,
            data=args.data,
            limit_train=20 * args.batch_size,
            epochs=PROBE_MIN_STEPS,  # a long run (none is trained): the fasthvae row's --speed auto probes
            out=tmp,
            **overrides,
        )

    with tempfile.TemporaryDirectory() as tmp:
        scale = measure_scale(config(tmp, PLAIN), args.peak_repeats)
    print(f"{scale.flops_per_image / 1e6:.1f} MFLOP per image; peaks: sgemm {scale.sgemm_peak:.1f}, "
          f"{scale.conv} {scale.conv_peak:.1f} GFLOP/s", flush=True)  # fmt: skip
    for name, (overrides, fused_ops) in variants(args.device).items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            timing = time_variant(
                config(tmp, overrides),
                fused_ops,
                args.warmup,
                args.steps,
                args.repeats,
                args.top_ops,
                name == BARE,
            )
        top_rows += [{"variant": name, "rank": rank, **entry} for rank, entry in enumerate(timing.top, 1)]
        resolution_rows += [{"variant": name, **entry} for entry in timing.resolutions]
        median, share, breaks = statistics.median(timing.windows), timing.share, timing.graph_breaks
        rows.append(
            {
                "variant": name,
                "model": args.model,
                "device": args.device,
                "batch_size": args.batch_size,
                "step_ms_median": round(1000 * median / args.steps, 2),
                "images_per_s": round(args.steps * args.batch_size / median, 1),
                "fused_ops_share": None if share is None else round(share, 4),
                "compile_s": round(timing.first_step - median / args.steps, 1) if breaks >= 0 else None,
                "graph_breaks": breaks if breaks >= 0 else None,
                "switches": timing.switches,
                **scale.row(args.steps * args.batch_size / median),
            }
        )
        print(rows[-1], flush=True)
    base = next((r["images_per_s"] for r in rows if r["variant"] == "plain"), rows[0]["images_per_s"])
    for row in rows:
        row["speedup_vs_plain"] = round(row["images_per_s"] / base, 3)

    header = ["variant", "step ms (median)", "images/s", "vs plain", "fused ops' share of the step"]
    header += ["compile s", "graph breaks", "switches on", "MFLOP / image", "GFLOP/s", "of sgemm peak"]
    header += ["of conv peak"]
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
                r["switches"],
                str(r["mflop_per_image"]),
                str(r["gflops"]),
                f"{100 * r['share_of_sgemm']:.0f}%",
                f"{100 * r['share_of_conv']:.0f}%",
            ],
            title=f"Training step, {args.model}{name_suffix}, batch {args.batch_size}, {machine()}",
            intro=f"Peaks measured in this process before the variants: fp32 sgemm 2048^2 "
            f"{scale.sgemm_peak:.1f} GFLOP/s; the model's commonest convolution, {scale.conv}, batch "
            f"{args.batch_size}, forward and backward, {scale.conv_peak:.1f} GFLOP/s. FLOPs per image: "
            "convolutions and matrix products of one eager step, forward and backward (FlopCounterMode).",
        )
    )
    if top_rows:
        print(
            write_report(
                top_rows,
                args.out / f"train_{args.device}_{args.model}{name_suffix}_top_ops",
                ["variant", "rank", "entry", "self ms per step", "share of the step", "calls per step"],
                lambda r: [
                    r["variant"],
                    str(r["rank"]),
                    f"`{r['name'][:90]}`",
                    str(r["self_ms_per_step"]),
                    f"{100 * r['share']:.1f}%",
                    str(r["calls_per_step"]),
                ],
                title=f"Where the step's time goes, {args.model}{name_suffix}, batch {args.batch_size}, "
                f"{machine()}",
                intro=f"Self time of one profiled window of {args.steps} steps after the timed ones "
                "(device time on CUDA); the top entries of each variant. Compiled code appears as its "
                "kernels (`graph_N_cpp_fused_...` on CPU, named by the ops each fuses).",
            )
        )
        print(
            write_report(
                resolution_rows,
                args.out / f"train_{args.device}_{args.model}{name_suffix}_by_resolution",
                ["variant", "resolution", "self ms per step", "share of the step"],
                lambda r: [
                    r["variant"],
                    r["resolution"],
                    str(r["self_ms_per_step"]),
                    f"{100 * r['share']:.1f}%",
                ],
                title=f"The step's time by resolution, {args.model}{name_suffix}, batch {args.batch_size}, "
                f"{machine()}",
                intro="The profiled window's self time of every entry, by the resolution of its first "
                "4-D input of a batch of images (forward and backward alike); `other`: entries without "
                "one (compiled kernels, which the profiler records without shapes, the optimizer and "
                "other work on the weights, autograd).",
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="hvae", choices=["vae", "hvae", "deep"])
    parser.add_argument("--preset", nargs="+", default=["small"], help="deep: the presets, a table each")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=None, help="CIFAR-10 .npz or folder (default: $FASTHVAE_DATA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, at least 1 (compiles)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--top-ops", type=int, default=0, metavar="N",
                        help="also write each variant's N entries with the most self time")  # fmt: skip
    parser.add_argument("--peak-repeats", type=int, default=5, help="timed runs of each peak (median)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step compiles)")
    if args.top_ops < 0:
        parser.error("--top-ops must be at least 0")
    if args.top_ops and args.device == "cpu":
        inductor_config.cpp.enable_kernel_profile = True  # name compiled kernels in the profile
    for preset in args.preset if args.model == "deep" else ["small"]:
        run_model(args, preset)


if __name__ == "__main__":
    main()
