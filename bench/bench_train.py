"""Training images/s: the study's plain PyTorch loop against fasthvae's path, and each speed feature
switched on alone, same model and batch, in one process.

Variants (all but ``bare`` through the trainer's own step):
- ``bare``: the plain model in a bare eager loop, ``model.loss`` + backward + ``torch.optim.AdamW``
  (no gradient norms, skip decisions, EMA or records): what the trainer's bookkeeping costs
- ``plain``: eager, unfused KL and sampling (plain PyTorch ops), torch DataLoader with workers
- ``+fused-ops``, ``+compile``, ``+amp``, ``+loader``, ``+channels-last``, ``+fused-adamw``,
  ``+onednn-conv`` (the deep model, where oneDNN is installed): plain plus one feature
- ``fasthvae``: the trainer's defaults for this device with ``--amp`` (the README's main command):
  ``--speed auto`` chooses compile, channels_last, the fused AdamW, the oneDNN convolutions and the
  loader by its probe (or its cache,
  ``fasthvae/training/speed.py``); the ``switches on`` column shows each row's, and where they came from.
  Every row runs with glibc's malloc as it comes, the fasthvae row too: the trainer's
  ``--keep-freed-memory`` is process-wide and cannot be undone, and ``bench/bench_allocator.py``
  measures it apart
- ``fasthvae+python-wrapper`` (CPU): the fasthvae row with ``--compile-wrapper python``, Inductor's
  python wrapper in place of the C++ one that the CPU step compiles with by default: what the C++
  wrapper gains
Each variant is built and runs ``--warmup`` steps (compilation included); then ``--repeats`` rounds
time one window of ``--steps`` steps of every variant, the order rotated each round, so that a drift
of the machine's speed (whole rounds faster or slower) reaches every variant alike. Each window
iterates its variant's loader afresh, after untimed steps that draw the batches a DataLoader keeps
in flight, and closes the iteration when it ends: a DataLoader's workers run only in their own
variant's windows. The median
window gives images/s; the ratio to plain is the median over rounds of the window against plain's
window of the same round. One more window under ``torch.profiler`` gives the fused ops' share of
the step (self time of the ``fasthvae::`` ops over all ops; for variants with the fused ops).
Compiled variants also report the compile time (the first step's time less a timed step's) and
dynamo's graph breaks (0: the whole step is one graph, as ``fullgraph=True`` demands). On CUDA
every variant runs that profiled window, which also gives the share of its wall time in which the
GPU ran a kernel or a copy (``GPU busy``). A variant whose first step fails to compile (a compiler
crash on this machine) is left out, named with its error in the report, and the others run. Writes
``train_<device>_<model>.{csv,md}``.

Every row is also on the machine's scale (``bench/machine_scale.py``): the FLOPs of a step per
image (counted once, on the plain variant's eager step: convolutions and matrix products, forward
and backward), the GFLOP/s that makes at the row's speed, and its share of two peaks measured at
the start of every round: an fp32 sgemm (2048^2) and the model's commonest convolution (the conv
shape holding most of the step's FLOPs) at the same batch, forward and backward, in the faster of
NCHW and channels_last; a row's share is the median over rounds of its window against its round's
peak. ``--model deep`` runs each ``--preset`` given, a table each.

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
import collections
import operator
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.autograd import DeviceType

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
from fasthvae.training.loop import COMPILE_ERRORS, error_line
from fasthvae.training.runtime import onednn_conv_unavailable
from fasthvae.training.speed import PROBE_MIN_STEPS, STAGED, SWITCHES, Feed

PLAIN = {
    "compile": False,
    "amp": False,
    "loader": "torch",
    "channels_last": False,
    "fused_optimizer": False,
    "onednn_conv": False,
}
FEATURES = {
    "+fused-ops": {},
    "+compile": {"compile": True},
    "+amp": {"amp": True},
    "+loader": {"loader": "resident"},
    "+channels-last": {"channels_last": True},
    "+fused-adamw": {"fused_optimizer": True},
    "+onednn-conv": {"onednn_conv": True},  # where the model and machine can run it
}


BARE = "bare"
PYTHON_WRAPPER = "fasthvae+python-wrapper"  # the CPU's fasthvae row with Inductor's python wrapper
BUSY_NOTE = (
    " GPU busy: the share of one more window's wall time, under the profiler, in which the GPU ran a"
    " kernel or a copy; the rest it waited on the host."
)


def variants(device: str, model: str) -> dict[str, tuple[dict, bool]]:
    """name -> (config overrides, fused ops on)."""
    table = {BARE: (PLAIN, False), "plain": (PLAIN, False)}
    onednn_reason = onednn_conv_unavailable(TrainConfig(model=model), torch.device(device))
    for name, change in FEATURES.items():
        if name != "+onednn-conv" or onednn_reason is None:
            table[name] = ({**PLAIN, **change}, name == "+fused-ops")
    defaults = {k: None for k in ("compile", "channels_last", "fused_optimizer", "onednn_conv", "loader")}
    table["fasthvae"] = ({**defaults, "amp": True}, True)  # python -m fasthvae.train --amp
    if device == "cpu":
        table[PYTHON_WRAPPER] = ({**defaults, "amp": True, "compile_wrapper": "python"}, True)
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


def device_busy(profile: torch.profiler.profile, wall_s: float) -> float:
    """The share of ``wall_s`` in which the device ran at least one of the profile's kernels or
    copies (their time ranges merged, so that streams running at once count once). Far below 1: the
    step waits on the host."""
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in profile.events() if e.device_type != DeviceType.CPU
    )
    busy_us, end = 0.0, float("-inf")
    for start, stop in spans:
        busy_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy_us / 1e6 / wall_s if wall_s > 0 else 0.0


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


def bare_step(model: torch.nn.Module, lr: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One step of a bare eager loop: ``model.loss``, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(x: torch.Tensor, weights: torch.Tensor) -> None:
        model.loss(x, weights)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class Variant:
    """One variant built and warmed up (compilation included), so that its timed windows can
    alternate with the other variants'. ``bare``: the trainer's model and loader in a bare loop
    instead of its step."""

    def __init__(self, name: str, config: TrainConfig, fused_ops: bool, warmup: int, bare: bool) -> None:
        self.name, self.fused_ops, self.batch = name, fused_ops, config.batch_size
        self.backend = "auto" if fused_ops else "reference"
        breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
        with use_backend(self.backend):
            self.trainer = Trainer(config)
            self.weights = torch.ones(self.trainer.model.num_levels, device=self.trainer.rt.device)
            self.step = bare_step(self.trainer.model, config.lr) if bare else self.trainer.step_fn
            self.feed = Feed(self.trainer.loader)
            self.sync = device_sync(self.trainer.rt.device)
            with self.feed.window():
                start = time.perf_counter()
                self._steps(1)
                self.first_step = time.perf_counter() - start
                self._steps(warmup - 1)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values()) - breaks_before
        self.graph_breaks = breaks if self.trainer.rt.compile else -1
        self.switches = switches_of(self.trainer)
        self.windows: list[float] = []

    def _steps(self, count: int) -> None:
        for _ in range(count):
            self.step(self.feed.next(), self.weights)
        self.sync()

    def settle(self) -> None:
        """One more untimed step once every variant is built: one built before another's
        ``--speed auto`` probe (which resets dynamo's caches) compiles again here, not in a window."""
        with use_backend(self.backend), self.feed.window():
            self._steps(1)

    def time_window(self, steps: int) -> float:
        """Seconds of ``steps`` steps (data loading included); kept in ``windows``. The window has
        its own iteration of the loader (a DataLoader's workers run only in their variant's windows,
        so their prefetching and refilling fall into no other variant's) and starts after the
        batches the loader keeps in flight have been drawn by untimed steps."""
        with use_backend(self.backend), self.feed.window():
            self._steps(self.feed.in_flight)
            start = time.perf_counter()
            self._steps(steps)
            self.windows.append(time.perf_counter() - start)
        return self.windows[-1]

    def profile(self, steps: int, top_ops: int) -> "Profiled":
        """One more window under the profiler: the fused ops' share (None without them), on CUDA the
        share of the window's wall time the GPU spent in kernels and copies, the ``top_ops`` entries
        with the most self time and the window by resolution (when asked)."""
        device = self.trainer.rt.device.type
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with use_backend(self.backend), self.feed.window():
            self._steps(self.feed.in_flight)
            with torch.profiler.profile(activities=activities, record_shapes=bool(top_ops)) as profile:
                start = time.perf_counter()
                self._steps(steps)  # ends with a device sync: the wall time holds every kernel
                wall_s = time.perf_counter() - start
        share = ops_share(profile, device) if self.fused_ops else None
        busy = device_busy(profile, wall_s) if device == "cuda" else None
        if not top_ops:
            return Profiled(share, busy)
        top = top_entries(profile, device, steps, top_ops)
        return Profiled(share, busy, top, by_resolution(profile, device, steps, self.batch))


@dataclass
class Profiled:
    """What one profiled window of a variant showed (see ``Variant.profile``)."""

    fused_ops_share: float | None = None
    device_busy: float | None = None
    top: list[dict] = field(default_factory=list)
    resolutions: list[dict] = field(default_factory=list)


def build_variants(
    configs: dict[str, TrainConfig], fused_ops: dict[str, bool], warmup: int
) -> tuple[list[Variant], dict[str, str]]:
    """Each variant built in order; one whose compilation fails (a compiler crash on this machine)
    is left out with its error in one line, so the others still run. None built: the first error."""
    built, failed, errors = [], {}, []
    for name, config in configs.items():
        try:
            built.append(Variant(name, config, fused_ops[name], warmup, name == BARE))
        except COMPILE_ERRORS as err:
            failed[name] = error_line(err)
            errors.append(err)
            torch._dynamo.reset()  # nothing of the failed graph is reused by the next variant
            print(f"{name}: left out, its first step failed to compile: {failed[name]}", flush=True)
            continue
        print(f"{name}: built, {built[-1].switches}", flush=True)
    if not built and errors:
        raise errors[0]
    return built, failed


def left_out(failed: dict[str, str]) -> str:
    """The report's sentence on the variants left out ("" when none was)."""
    named = "; ".join(f"`{name}` ({error})" for name, error in failed.items())
    return f" Left out, their first step failed to compile: {named}." if failed else ""


def switches_of(trainer: Trainer) -> str:
    """The speed switches a trainer runs with, and where ``--speed`` took them from."""
    on = [name for name in (*SWITCHES, *STAGED) if getattr(trainer.rt, name)] + [
        f"{trainer.rt.loader} loader"
    ]
    return f"{', '.join(on)} ({trainer.speed['source'].split(':')[0]})"


@dataclass
class Scale:
    """The machine's scale of one model and batch: FLOPs per image of a step, the commonest conv,
    and its peaks (GFLOP/s), measured once per round (the machine's speed drifts)."""

    flops_per_image: float
    conv: ConvShape
    batch: int
    device: torch.device
    sgemm_peaks: list[float] = field(default_factory=list)
    conv_peaks: list[float] = field(default_factory=list)
    conv_layouts: list[str] = field(default_factory=list)  # the faster layout of each round's conv

    def measure_peaks(self, repeats: int) -> None:
        self.sgemm_peaks.append(sgemm_gflops(self.device, repeats=repeats))
        gflops, layout = conv_gflops(self.conv, self.batch, self.device, repeats)
        self.conv_peaks.append(gflops)
        self.conv_layouts.append(layout)

    def row(self, windows: list[float], images_per_window: int) -> dict:
        """GFLOP/s of the median window, and the median over rounds of each window's share of the
        peaks measured in its round."""
        gflops = [self.flops_per_image * images_per_window / t / 1e9 for t in windows]
        return {
            "mflop_per_image": round(self.flops_per_image / 1e6, 1),
            "gflops": round(self.flops_per_image * images_per_window / statistics.median(windows) / 1e9, 1),
            "share_of_sgemm": round(statistics.median(map(operator.truediv, gflops, self.sgemm_peaks)), 3),
            "share_of_conv": round(statistics.median(map(operator.truediv, gflops, self.conv_peaks)), 3),
        }

    def describe(self) -> str:
        def spread(peaks: list[float]) -> str:
            return f"{statistics.median(peaks):.1f} (rounds: {min(peaks):.1f}-{max(peaks):.1f})"

        counts = collections.Counter(self.conv_layouts)
        layouts = ", ".join(f"{name} in {n} of {len(self.conv_layouts)}" for name, n in counts.most_common())

        return (
            f"fp32 sgemm 2048^2 {spread(self.sgemm_peaks)} GFLOP/s; the model's commonest convolution, "
            f"{self.conv}, batch {self.batch}, forward and backward, {spread(self.conv_peaks)} GFLOP/s "
            f"in the faster layout of each round ({layouts})"
        )


def count_scale(config: TrainConfig) -> Scale:
    """Count the FLOPs of one eager step of ``config`` (plain PyTorch ops) and find its commonest conv."""
    with use_backend("reference"):
        trainer = Trainer(config)
        trainer.loader.set_epoch(0)
        x, _ = next(iter(trainer.loader))
        weights = torch.ones(trainer.model.num_levels, device=trainer.rt.device)
        if isinstance(trainer.model, DeepHVAE):
            trainer.model.heads_as_one = False  # the model's own FLOPs, not the zero blocks
        flops = count_flops(lambda: trainer.step_fn(x, weights))
        conv = commonest_conv(trainer.model, lambda: trainer.model(x))
    return Scale(flops / len(x), conv, len(x), trainer.rt.device)


def run_rounds(variants: list[Variant], scale: Scale, args: argparse.Namespace) -> None:
    """``args.repeats`` rounds: the peaks, then one window of every variant, the order rotated each
    round, so that a drift of the machine's speed reaches every variant alike."""
    for r in range(args.repeats):
        scale.measure_peaks(args.peak_repeats)
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
            variant.time_window(args.steps)


def paired(windows: list[float], reference: list[float]) -> tuple[float, int]:
    """The median over rounds of ``reference``'s window over ``windows``' (above 1: faster), and
    the rounds in which it was faster."""
    ratios = [r / t for r, t in zip(reference, windows, strict=True)]
    return round(statistics.median(ratios), 3), sum(x > 1 for x in ratios)


def named(built: list[Variant], name: str) -> Variant | None:
    """The variant called ``name`` among ``built``, or None where it was not run."""
    return next((v for v in built if v.name == name), None)


def against_best_switch(built: list[Variant]) -> str:
    """The fasthvae row against the fastest single-switch row (by median window), round by round;
    empty when either was not run."""
    fasthvae = named(built, "fasthvae")
    switches = [v for v in built if v.name in FEATURES]
    if fasthvae is None or not switches:
        return ""
    best = min(switches, key=lambda v: statistics.median(v.windows))
    return against(fasthvae, best, "the fastest single switch")


def against_python_wrapper(built: list[Variant]) -> str:
    """The fasthvae row against itself under Inductor's python wrapper, round by round; empty when
    either was not run."""
    fasthvae, python = named(built, "fasthvae"), named(built, PYTHON_WRAPPER)
    if fasthvae is None or python is None:
        return ""
    return against(fasthvae, python, "Inductor's python wrapper")


def against(fasthvae: Variant, other: Variant, what: str) -> str:
    """One sentence: the fasthvae row's speed-up over ``other``, the median over rounds."""
    speedup, faster = paired(fasthvae.windows, other.windows)
    return (
        f" The fasthvae row against {what}, `{other.name}`: {speedup}x, faster in "
        f"{faster} of {len(other.windows)} rounds."
    )


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
            # One epoch holds every step of the run: the DataLoader's workers fork once per epoch, a
            # cost a real epoch spreads over ~1,500 steps and a short one would put in the windows.
            limit_train=(args.warmup + 1 + args.steps * (args.repeats + 1)) * args.batch_size,
            epochs=PROBE_MIN_STEPS,  # a long run (none is trained): the fasthvae row's --speed auto probes
            # glibc's malloc as it comes for every row: the setting is process-wide and cannot be
            # undone, so it would reach the plain rows too (bench/bench_allocator.py measures it).
            keep_freed_memory=False,
            out=tmp,
            **overrides,
        )

    chosen = {n: v for n, v in variants(args.device, args.model).items() if not args.only or n in args.only}
    torch._dynamo.reset()
    with ExitStack() as stack:
        scale = count_scale(config(stack.enter_context(tempfile.TemporaryDirectory()), PLAIN))
        print(f"{scale.flops_per_image / 1e6:.1f} MFLOP per image", flush=True)
        configs = {
            name: config(stack.enter_context(tempfile.TemporaryDirectory()), o)
            for name, (o, _) in chosen.items()
        }
        fused = {name: fused_ops for name, (_, fused_ops) in chosen.items()}
        built, failed = build_variants(configs, fused, args.warmup)
        for variant in built:
            variant.settle()
        run_rounds(built, scale, args)
        print(f"peaks: {scale.describe()}", flush=True)
        plain = named(built, "plain") or built[0]
        for variant in built:
            profiled = Profiled()
            if variant.fused_ops or args.top_ops or args.device == "cuda":
                profiled = variant.profile(args.steps, args.top_ops)
            share, busy = profiled.fused_ops_share, profiled.device_busy
            top_rows += [{"variant": variant.name, "rank": n, **e} for n, e in enumerate(profiled.top, 1)]
            resolution_rows += [{"variant": variant.name, **entry} for entry in profiled.resolutions]
            median, breaks = statistics.median(variant.windows), variant.graph_breaks
            speedup, faster = paired(variant.windows, plain.windows)
            rows.append(
                {
                    "variant": variant.name,
                    "model": args.model,
                    "device": args.device,
                    "batch_size": args.batch_size,
                    "step_ms_median": round(1000 * median / args.steps, 2),
                    "images_per_s": round(args.steps * args.batch_size / median, 1),
                    "speedup_vs_plain": speedup,
                    "faster_rounds": faster,
                    "fused_ops_share": None if share is None else round(share, 4),
                    "device_busy": None if busy is None else round(busy, 4),
                    "compile_s": round(variant.first_step - median / args.steps, 1) if breaks >= 0 else None,
                    "graph_breaks": breaks if breaks >= 0 else None,
                    "switches": variant.switches,
                    **scale.row(variant.windows, args.steps * args.batch_size),
                    "windows_ms": " ".join(f"{1000 * t / args.steps:.1f}" for t in variant.windows),
                }
            )
            print(rows[-1], flush=True)
        comparisons = against_best_switch(built) + against_python_wrapper(built)

    header = ["variant", "step ms (median)", "images/s", "vs plain (rounds faster)"]
    header += ["fused ops' share of the step"]
    header += ["GPU busy"] if args.device == "cuda" else []
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
                f"{r['speedup_vs_plain']}x ({r['faster_rounds']}/{args.repeats})",
                "—" if r["fused_ops_share"] is None else f"{100 * r['fused_ops_share']:.1f}%",
                *([f"{100 * r['device_busy']:.0f}%"] if args.device == "cuda" else []),
                "—" if r["compile_s"] is None else str(r["compile_s"]),
                "—" if r["graph_breaks"] is None else str(r["graph_breaks"]),
                r["switches"],
                str(r["mflop_per_image"]),
                str(r["gflops"]),
                f"{100 * r['share_of_sgemm']:.0f}%",
                f"{100 * r['share_of_conv']:.0f}%",
            ],
            title=f"Training step, {args.model}{name_suffix}, batch {args.batch_size}, {machine()}",
            intro=f"{args.repeats} rounds, each the peaks, then one window of {args.steps} steps of every "
            "variant, the order rotated each round; images/s and GFLOP/s of the median window, the ratio "
            "to plain and the shares of the peaks the medians over rounds (each window against plain's "
            f"and the peaks of its own round). Peaks (median over rounds): {scale.describe()}. FLOPs per "
            "image: convolutions and matrix products of one eager step, forward and backward "
            f"(FlopCounterMode).{comparisons}{left_out(failed)}{BUSY_NOTE if args.device == 'cuda' else ''}",
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
    parser.add_argument("--repeats", type=int, default=5, help="rounds (one window of every variant each)")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--top-ops", type=int, default=0, metavar="N",
                        help="also write each variant's N entries with the most self time")  # fmt: skip
    parser.add_argument("--peak-repeats", type=int, default=5, help="timed runs of a peak per round")
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
