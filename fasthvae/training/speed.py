"""``--speed auto``: the trainer's speed switches and loader chosen by measuring them on this machine,
model and batch. ``--speed fixed``: the defaults (compile, channels_last and the fused AdamW on;
the resident loader).

The probe tries every combination of the switches the command line left unset (``--compile``,
``--channels-last``, ``--fused-optimizer``). Each candidate builds the run's model, optimizer and
step as the trainer does and takes ``WARMUP_STEPS`` steps on a synthetic batch of the run's shape
(compilation included); compiled candidates that differ only in the optimizer share one model and
its compiled objective, so each memory format is compiled once. Then
``ROUNDS`` rounds time one window of every candidate, the order rotated each round; each window is
compared with the defaults' window of the same round, so that a drift in the machine's speed
(whole rounds faster or slower) cancels. A candidate replaces the defaults only if
it was faster in every round and by ``MIN_GAIN`` or more in the median of its ratios: a choice
made beyond the run-to-run spread; of such candidates the one with the lowest median ratio wins.
A candidate slower than the defaults in a round can no longer be chosen and is not timed again;
a stage ends when no other candidate is left (the rule unchanged: a candidate replaces the
defaults only after all ``ROUNDS`` rounds; the probe's time goes to the close contenders).

Then each staged switch left unset that the run can use (``--onednn-conv``: the deep model on CPU
with oneDNN installed) is timed the same way, on and off, with the chosen switches (the chosen
step reused, the other built): a stage of two candidates, not a doubling of the first stage's.

Then, where ``--loader`` is not given and the training images are an array, the loaders (``torch``
with its worker processes, ``resident``) are timed the same way, each feeding the chosen step with
the run's own images. Each loader's window opens its own iterator and closes it after (the
DataLoader's workers live only during its windows, so their prefetching and refilling fall into no
other loader's window) and starts after as many untimed steps as the DataLoader keeps batches in
flight, so that its queue, full when the window starts, was filled under the same contention as
the window's own batches (the resident loader keeps none: its windows start at once). The loaders
feed the step stage's chosen step, already compiled and warm.

The choice is cached per machine (CPU, its flags under any ISA cap and the caps themselves, threads,
GPU), torch and fasthvae version, a digest of fasthvae's sources (in a checkout its kernels' too),
device, model, batch, precision, compile mode and Inductor wrapper in ``~/.cache/fasthvae/speed/``
(``$XDG_CACHE_HOME`` respected; ``$FASTHVAE_CACHE_DIR`` replaces ``~/.cache/fasthvae``), so a
machine probes a model once. A run of fewer than ``PROBE_MIN_STEPS`` steps keeps the defaults: the
probe would cost more than it could save. The choice, where it came from and the probe's times (its
own, each stage's, every candidate's) are printed and go into config.json (``runtime.speed``). The
probe leaves the random state as it found it: a run that probed trains as a ``--speed fixed`` run
given the chosen switches.
"""

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fasthvae.data import BatchLoader, LoaderOptions, make_loader
from fasthvae.hardware import ISA_CAP_ENVS, cpu_name, usable_cpu_flags
from fasthvae.training.checkpoint import write_text_atomic
from fasthvae.training.config import TrainConfig
from fasthvae.training.distributed import DistInfo, broadcast_from_main
from fasthvae.training.loop import Stepper, build_stepper, error_line
from fasthvae.training.runtime import Runtime, onednn_conv_unavailable
from fasthvae.training.state import build_state
from fasthvae.version import __version__

SWITCHES = ("compile", "channels_last", "fused_optimizer")  # the step's, measured on a synthetic batch
# Measured after the switches, on and off with the chosen ones (a switch of its own would double the
# candidates, each compiled), where the model and machine can run it: name -> why it cannot.
STAGED = {"onednn_conv": onednn_conv_unavailable}
CHOICES = (*SWITCHES, *STAGED, "loader")  # the loader is measured feeding the chosen step
WARMUP_STEPS = 2  # the first compiles; the second measures a step for the window's length
ROUNDS = 4
MIN_GAIN = 0.03  # a candidate must save this share of the defaults' step time to replace them
# The timed windows of all candidates of a stage together, at most (all ``ROUNDS`` rounds): the
# step's switches (up to 8 candidates), each staged switch (2), then the loaders (2). The whole warm
# probe of the deep model at batch 32 on 2 cores: 42-46 s, its three compilations 22-24 s
# (results/bench/README.md).
TIMING_SECONDS = {"step": 25.0, "staged": 10.0, "loader": 15.0}
PROBE_MIN_STEPS = 2000
CACHE_ENV = "FASTHVAE_CACHE_DIR"
IMAGE_SHAPE = (3, 32, 32)
KEY_CPU_FLAGS = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}
# What defines a step's cost, from the config (the rest: learning rates, seeds, data, outputs).
KEY_FIELDS = (
    "model",
    "preset",
    "layout",
    "width",
    "zdim",
    "channels",
    "latent",
    "z1_channels",
    "likelihood",
    "batch_size",
    "compile_mode",
)


@dataclass
class Candidate:
    """One combination of the switches and its measurements: its first step's seconds (compilation
    included; none where it reuses a step built before: a staged switch's first candidate), and
    seconds per step of each window. ``step``: its step on a batch, built and warm (kept for the
    loader stage; not recorded)."""

    switches: dict[str, bool | str]
    first_step_s: float = math.nan
    windows: list[float] = field(default_factory=list)
    step: Callable[[torch.Tensor], object] | None = field(default=None, repr=False)
    failed: str | None = None  # why its first step raised (not timed, never chosen)

    def record(self) -> dict:
        if self.failed:
            return {**self.switches, "failed": self.failed}
        first = {} if math.isnan(self.first_step_s) else {"first_step_s": round(self.first_step_s, 2)}
        return {**self.switches, **first, "step_ms": [round(1000 * w, 2) for w in self.windows]}


def cache_dir() -> Path:
    """Where speed choices are cached: ``$FASTHVAE_CACHE_DIR/speed``, else
    ``$XDG_CACHE_HOME/fasthvae/speed``, else ``~/.cache/fasthvae/speed``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "speed"
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fasthvae" / "speed"


def digested_files() -> list[Path]:
    """fasthvae's Python sources and, in a checkout, its kernels' C++ and CUDA sources (``csrc/``,
    beside the package: a rebuilt kernel changes the step as a changed model does)."""
    package = Path(__file__).resolve().parents[1]
    kernels = package.parent / "csrc"
    native = (
        [p for p in kernels.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")]
        if kernels.is_dir()
        else []
    )
    return sorted(package.rglob("*.py")) + sorted(native)


@functools.cache
def code_digest() -> str:
    """A digest of :func:`digested_files`, so that a changed model, step or kernel is probed again
    without a new version number."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for path in digested_files():
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(config: TrainConfig, rt: Runtime, world_size: int) -> dict:
    """Everything a cached choice depends on."""
    gpu = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None
    return {
        "machine": {
            "cpu": cpu_name(),
            "flags": sorted(usable_cpu_flags() & KEY_CPU_FLAGS),
            "isa_caps": {name: os.environ.get(name) for name in ISA_CAP_ENVS},
            "threads": torch.get_num_threads(),
            "gpu": gpu,
        },
        "torch": torch.__version__,
        "fasthvae": __version__,
        "code": code_digest(),
        "device": rt.device.type,
        "world_size": world_size,
        "amp_dtype": str(rt.amp_dtype),
        "compile_wrapper": rt.compile_wrapper,
        "config": {name: getattr(config, name) for name in KEY_FIELDS}
        | {"ema": bool(config.ema), "skip": bool(config.skip_factor), "clip": bool(config.grad_clip)},
        "given": {name: getattr(config, name) for name in CHOICES if getattr(config, name) is not None},
        "defaults": {name: getattr(rt, name) for name in CHOICES},
        "workers": config.workers,
    }


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.json"


def candidates(config: TrainConfig, rt: Runtime) -> list[dict[str, bool]]:
    """Every combination of the switches left unset, the defaults (``rt``'s) first."""
    free = [name for name in SWITCHES if getattr(config, name) is None]
    default = {name: getattr(rt, name) for name in SWITCHES}
    return [
        default | dict(zip(free, values, strict=True))
        for values in itertools.product(*[(getattr(rt, name), not getattr(rt, name)) for name in free])
    ]


def decide(measured: list[Candidate]) -> dict[str, bool | str]:
    """The defaults (``measured[0]``; where they failed, the first candidate that ran) unless a
    candidate beat them in every round, by at least ``MIN_GAIN`` in the median of its per-round
    ratios; of such candidates, the lowest median."""
    measured = [c for c in measured if not c.failed]
    default = measured[0]

    def ratios(c: Candidate) -> list[float]:
        return [a / b for a, b in zip(c.windows, default.windows, strict=True)]

    faster = [
        c
        for c in measured[1:]
        if faster_in_every_round(c, default) and statistics.median(ratios(c)) <= 1 - MIN_GAIN
    ]
    return min(faster, key=lambda c: statistics.median(ratios(c))).switches if faster else default.switches


def faster_in_every_round(candidate: Candidate, default: Candidate) -> bool:
    """Whether ``candidate`` was timed in every round ``default`` was, each window shorter."""
    return len(candidate.windows) == len(default.windows) and all(
        a < b for a, b in zip(candidate.windows, default.windows, strict=True)
    )


def synthetic_batch(config: TrainConfig, rt: Runtime) -> torch.Tensor:
    """A batch of the run's shape: images quantized to 8 bits in [0, 1], as the loaders give."""
    pixels = torch.randint(0, 256, (config.batch_size, *IMAGE_SHAPE), device=rt.device)
    x = pixels.float() / 255
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    steps: list[Callable[[], object]],
    measured: list[Candidate],
    device: torch.device,
    windows: list[Callable[[], AbstractContextManager]] | None = None,
    lead_ins: list[int] | None = None,
    stage: str = "step",
) -> None:
    """Warm-up, then up to ``ROUNDS`` rounds of one window per step function, the order rotated each
    round; each window ~TIMING_SECONDS[stage] / (ROUNDS x candidates) long, judged by a warm-up step.
    A window runs inside its candidate's ``windows`` context, after its ``lead_ins`` untimed steps.
    After each round, a candidate slower than the first (the defaults) is timed no more; the rounds
    end when only the first is left."""
    windows = windows or [contextlib.nullcontext] * len(steps)
    lead_ins = lead_ins or [0] * len(steps)
    step_s = []
    for step, window in zip(steps, windows, strict=True):
        with window():
            start = time.perf_counter()
            for _ in range(WARMUP_STEPS - 1):
                step()
            _sync(device)
            step_s.append((time.perf_counter() - start) / max(1, WARMUP_STEPS - 1))
    window_s = TIMING_SECONDS[stage] / (ROUNDS * len(steps))
    lengths = [max(1, min(50, round(window_s / s))) for s in step_s]
    timed = list(range(len(steps)))
    for r in range(ROUNDS):
        if r > 0:
            timed = [i for i in timed if i == 0 or faster_in_every_round(measured[i], measured[0])]
            if len(timed) == 1:
                break
        for i in [timed[(r + k) % len(timed)] for k in range(len(timed))]:
            with windows[i]():
                for _ in range(lead_ins[i]):
                    steps[i]()
                _sync(device)
                start = time.perf_counter()
                for _ in range(lengths[i]):
                    steps[i]()
                _sync(device)
                measured[i].windows.append((time.perf_counter() - start) / lengths[i])


def _first_step(step: Callable[[], object], candidate: Candidate, device: torch.device) -> None:
    start = time.perf_counter()
    step()
    _sync(device)
    candidate.first_step_s = time.perf_counter() - start


def measure(
    config: TrainConfig,
    rt: Runtime,
    switch_sets: list[dict[str, bool]],
    warm: Candidate | None = None,
    stage: str = "step",
) -> list[Candidate]:
    """The step switches' candidates on a synthetic batch, timed in rotated rounds. ``warm``: a
    candidate measured before, whose built step serves the first switch set (no second compile)."""
    steps: list[Callable[[], object]] = []
    measured, ran, errors = [], [], []
    compiled: dict[tuple, Stepper] = {}  # by the switches but the optimizer: one compilation each
    for i, switches in enumerate(switch_sets):
        crt = replace(rt, **switches)
        candidate = Candidate(switches)
        measured.append(candidate)
        x = synthetic_batch(config, crt)
        if warm is not None and i == 0:
            candidate.step = warm.step
        else:
            model_switches = tuple(sorted((k, v) for k, v in switches.items() if k != "fused_optimizer"))
            try:  # the switches as given: a compilation that fails is this candidate's failure
                stepper = _build_stepper(replace(config, **switches), crt, compiled.get(model_switches))
                candidate.step = _on_a_batch(stepper, config, crt)
                _first_step(lambda step=candidate.step, x=x: step(x), candidate, rt.device)
                if crt.compile:
                    compiled.setdefault(model_switches, stepper)
            except Exception as err:  # a switch this machine cannot run: left out, said why
                candidate.step, candidate.failed = None, error_line(err)
                errors.append(err)
                warning = f"fasthvae.train: speed auto: {switches} failed, left out ({candidate.failed})"
                print(warning, file=sys.stderr, flush=True)
                continue
        steps.append(lambda step=candidate.step, x=x: step(x))
        ran.append(candidate)
    if not ran:
        raise errors[0]
    time_rounds(steps, ran, rt.device, stage=stage)
    return measured


def staged_free(config: TrainConfig, rt: Runtime) -> list[str]:
    """The staged switches the command line left unset and this run can use."""
    return [
        name
        for name, unavailable in STAGED.items()
        if getattr(config, name) is None and unavailable(config, rt.device) is None
    ]


def _build_stepper(config: TrainConfig, rt: Runtime, sibling: Stepper | None = None) -> Stepper:
    """The run's stepper with ``rt``'s switches, compiled as the run compiles it (its wrapper too), so
    that the run's own compile comes from the caches the probe filled. ``sibling``: a compiled
    stepper whose switches differ from ``rt``'s only in the optimizer; its model and compiled
    objective serve this one too (one compilation for both, the two optimizers stepping the same
    weights)."""
    if sibling is None:
        return build_stepper(build_state(config, rt), config, rt, DistInfo())
    state = build_state(config, rt, model=sibling.state.model)
    return build_stepper(state, config, rt, DistInfo(), objective=sibling.objective)


def _on_a_batch(stepper: Stepper, config: TrainConfig, rt: Runtime) -> Callable[[torch.Tensor], object]:
    """``stepper``'s step on a batch: all KL levels weighted 1, KL balancing at full strength where
    the run has it."""
    weights = torch.ones(stepper.state.model.num_levels, device=rt.device)
    balance = torch.ones((), device=rt.device) if config.kl_balance else None
    return lambda x: stepper(x, weights, balance)


def endless(loader: BatchLoader) -> Iterator[torch.Tensor]:
    """A loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from (x for x, _ in loader)


class Feed:
    """A loader's batches one window at a time: ``window()`` opens a fresh iteration (the
    DataLoader's workers start) and closes it when the window ends (they stop). ``in_flight``: the
    batches the loader prepares ahead (``BatchLoader.batches_in_flight``), which untimed steps draw
    before a window is timed."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.in_flight = loader.batches_in_flight
        self.batches: Iterator[torch.Tensor] | None = None

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        self.batches = endless(self.loader)
        try:
            yield
        finally:
            self.batches.close()
            self.batches = None

    def next(self) -> torch.Tensor:
        return next(self.batches)


def measure_loaders(
    config: TrainConfig,
    rt: Runtime,
    images: np.ndarray,
    names: list[str],
    step: Callable[[torch.Tensor], object] | None = None,
) -> list[Candidate]:
    """The loaders' candidates, each feeding the run's step (``rt``'s switches; ``step``, the step
    stage's warm one, else built here) with the run's training images, timed in rotated rounds."""
    step = step or _on_a_batch(_build_stepper(config, rt), config, rt)
    options = LoaderOptions(
        config.batch_size, flip=config.flip, drop_last=True, seed=config.seed, channels_last=rt.channels_last
    )
    steps, measured, feeds = [], [], []
    for name in names:
        feeds.append(Feed(make_loader(name, images, options, rt.device, num_workers=config.workers)))
        steps.append(lambda feed=feeds[-1]: step(feed.next()))
        measured.append(Candidate({"loader": name}))
        with feeds[-1].window():
            _first_step(steps[-1], measured[-1], rt.device)
    windows, lead_ins = [feed.window for feed in feeds], [feed.in_flight for feed in feeds]
    time_rounds(steps, measured, rt.device, windows, lead_ins, stage="loader")
    return measured


def loader_candidates(config: TrainConfig, rt: Runtime, images: object) -> list[str]:
    """The run's default loader and the other of ``torch`` and ``resident``, where ``--loader`` is
    not given and the training images are an array (image files on disk need DALI); else none."""
    if config.loader is not None or not isinstance(images, np.ndarray):
        return []
    return [rt.loader, "resident" if rt.loader == "torch" else "torch"]


def keep_chosen(measured: list[Candidate], choice: dict) -> Candidate:
    """The candidate with the ``choice``'s switches; the others' models and optimizers go now."""
    chosen = next(c for c in measured if c.switches == choice)
    for candidate in measured:
        if candidate is not chosen:
            candidate.step = None
    return chosen


def probe(config: TrainConfig, rt: Runtime, images: object) -> dict:
    """Measure the step's candidates and decide; then each staged switch's and, with the chosen
    switches, the loaders'. The random state as before. The record for config.json: the choice, the
    probe's seconds and each stage's, every candidate's times."""
    start = time.perf_counter()
    stage_s: dict[str, float] = {}  # each stage's seconds: builds, first steps, warm-up steps, windows

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        since = time.perf_counter()
        yield
        stage_s[name] = round(time.perf_counter() - since, 1)

    devices = [rt.device] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        with stage("switches"):
            measured = measure(config, rt, candidates(config, rt))
            choice = dict(decide(measured))
            chosen = keep_chosen(measured, choice)
        for name in staged_free(config, rt):
            default = getattr(rt, name)
            with stage(name):
                pair = measure(
                    config, rt, [choice | {name: default}, choice | {name: not default}], chosen, "staged"
                )
                choice = dict(decide(pair))
                chosen = keep_chosen(pair, choice)
            measured += pair
        loaders = loader_candidates(config, rt, images)
        if loaders:
            with stage("loader"):
                timed = measure_loaders(config, replace(rt, **choice), images, loaders, chosen.step)
                choice |= decide(timed)
            measured += timed
    torch._dynamo.reset()  # the probe's graphs hold its models; the run compiles its own (cache-warm)
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "choice": choice,
        "probe_s": round(time.perf_counter() - start, 1),
        "stage_s": stage_s,
        "candidates": [c.record() for c in measured],
    }


def choice_text(choice: dict[str, bool | str]) -> str:
    """A choice as words: "compile on, channels_last off, loader resident"."""
    return ", ".join(
        f"{name} {value}" if isinstance(value, str) else f"{name} {'on' if value else 'off'}"
        for name, value in choice.items()
    )


def describe(record: dict) -> str:
    """One line: the choice and where it came from."""
    choice = choice_text(record["choice"])
    source = record["source"]
    if source == "probe":
        timed = [c for c in record["candidates"] if "step_ms" in c]
        fastest = min(timed, key=lambda c: statistics.median(c["step_ms"]))
        stages = ", ".join(f"{name} {s} s" for name, s in record["stage_s"].items())
        return (
            f"speed auto: {choice} (probe of {len(record['candidates'])} candidates, "
            f"{record['probe_s']} s: {stages}; fastest median "
            f"{statistics.median(fastest['step_ms']):.1f} ms/step; cached in {record['cache']})"
        )
    return f"speed {record['mode']}: {choice} ({source})"


def choose_speed(
    config: TrainConfig, rt: Runtime, dist: DistInfo, planned_steps: int, images: object
) -> tuple[Runtime, dict]:
    """The runtime with the switches ``config.speed`` picks, and its record (for config.json).
    ``images``: the run's training images (an array, or image files)."""
    defaults = {name: getattr(rt, name) for name in CHOICES}
    record: dict = {"mode": config.speed, "choice": defaults}
    if config.speed == "fixed":
        record["source"] = "fixed defaults"
    elif (
        all(getattr(config, name) is not None for name in SWITCHES)
        and not staged_free(config, rt)
        and not loader_candidates(config, rt, images)
    ):
        record["source"] = "every switch given"
    elif planned_steps < PROBE_MIN_STEPS:
        record["source"] = f"defaults: a run of {planned_steps} steps is shorter than a probe pays for"
    else:
        probed = _cached_or_probed(config, rt, dist, images) if dist.is_main else None
        record = broadcast_from_main(probed, dist)
    if dist.is_main:
        print(f"fasthvae.train: {describe(record)}", file=sys.stderr, flush=True)
    return replace(rt, **record["choice"]), record


def _cached_or_probed(config: TrainConfig, rt: Runtime, dist: DistInfo, images: object) -> dict:
    key = cache_key(config, rt, dist.world_size)
    path = cache_path(key)
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["record"] | {"source": "cache", "cache": str(path)}
        except (OSError, ValueError, KeyError):
            pass  # unreadable: probe again and rewrite it
    record = {"mode": "auto", **probe(config, rt, images), "source": "probe", "cache": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps({"key": key, "record": record}, indent=2) + "\n", path)
    return record
