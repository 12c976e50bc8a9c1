"""The training step with freed memory kept in the process against glibc's thresholds, in one process.

``fasthvae.training.allocator.keep_freed_memory`` (the trainer's ``--keep-freed-memory``, on by
default) raises glibc's mmap and trim thresholds; glibc cannot return to its own rule for them (which
raises them as blocks are freed) once they are set. So the step first runs ``--default-windows``
windows as the process started, with glibc's own rule (its page faults per step and time), then
alternates rounds of two fixed settings: freed memory kept, and glibc's rule emulated with the
mmap threshold at ``--emulated-mib`` and the trim threshold at twice that (chosen so that its page
faults per step match the defaults' first windows: the table shows both). Each round times one
window of ``--steps`` steps of each setting, the order alternating. The step is the trainer's
(``--speed fixed`` defaults, ``--amp``) on one batch of the training set. Reports the median window,
minor page faults per step (``getrusage``), and the kept setting's time against the emulated
default's, round by round; writes ``allocator_<device>_<model>.{csv,md}``.

    python -m bench.bench_allocator [--model deep] [--preset small] [--batch-size 32] [--rounds 12]
                                    [--no-compile]
"""

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.one_step import add_step_arguments, model_names, one_batch_step
from bench.report import write_report
from fasthvae.hardware import machine
from fasthvae.train import TrainConfig, Trainer
from fasthvae.training import allocator


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def window(step: Callable[[], object], steps: int) -> tuple[float, float]:
    """Seconds per step and minor page faults per step of one window of ``steps`` steps."""
    faults, start = minor_faults(), time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, (minor_faults() - faults) / steps


def build_step(args: argparse.Namespace, out: str) -> Callable[[], object]:
    config = TrainConfig(
        model=args.model,
        preset=args.preset,
        batch_size=args.batch_size,
        amp=True,
        speed="fixed",
        compile=args.compile,
        keep_freed_memory=False,  # this benchmark sets the thresholds itself
        data=args.data,
        limit_train=args.batch_size,
        epochs=1,
        out=out,
    )
    return one_batch_step(Trainer(config))[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per window")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--default-windows", type=int, default=3)
    parser.add_argument("--emulated-mib", type=int, default=16)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if not allocator.is_glibc():
        raise SystemExit("bench_allocator measures glibc's malloc: this C library is not glibc")
    with tempfile.TemporaryDirectory() as tmp:
        step = build_step(args, tmp)
        for _ in range(args.warmup):
            step()
        default = [window(step, args.steps) for _ in range(args.default_windows)]
        emulated = args.emulated_mib * 2**20
        settings = {
            "kept": allocator.keep_freed_memory,
            "emulated": lambda: allocator.set_thresholds(emulated, 2 * emulated),
        }
        timed: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
        for r in range(args.rounds):
            for name in list(settings)[:: 1 if r % 2 == 0 else -1]:
                settings[name]()
                step()  # the first step after a change of setting settles the heap
                timed[name].append(window(step, args.steps))
    ratios = [k[0] / e[0] for k, e in zip(timed["kept"], timed["emulated"], strict=True)]
    mib = args.emulated_mib
    rows = [
        row("glibc's own rule (first windows)", default),
        row(f"emulated: mmap {mib} MiB, trim {2 * mib} MiB", timed["emulated"]),
        row("freed memory kept (the trainer's default)", timed["kept"], ratios),
    ]
    label, name = model_names(args)
    stem = Path(args.out) / f"allocator_cpu_{name}"
    intro = (
        f"{machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The trainer's step "
        f"(`--speed fixed` defaults{'' if args.compile else ' but eager'}, `--amp`), "
        f"{label}, batch {args.batch_size}; "
        f"{args.rounds} rounds of one {args.steps}-step window per setting, order alternating."
    )
    header = ["setting", "median ms / step", "page faults / step", "x emulated default (rounds faster)"]

    def cells(r: dict) -> list[str]:
        return [r["setting"], f"{r['ms_per_step']:.1f}", f"{r['faults_per_step']:.0f}", r["vs_emulated"]]

    title = "Freed memory kept against glibc's thresholds"
    print(write_report(rows, stem, header, cells, title=title, intro=intro))


def row(name: str, windows: list[tuple[float, float]], ratios: list[float] | None = None) -> dict:
    """A setting's median window and page faults; with ``ratios`` (its windows over the emulated
    default's, round by round) their median and the rounds it was faster in."""
    vs = (
        ""
        if ratios is None
        else f"{statistics.median(ratios):.3f} ({sum(x < 1 for x in ratios)}/{len(ratios)})"
    )
    return {
        "setting": name,
        "ms_per_step": statistics.median(w[0] for w in windows) * 1000,
        "faults_per_step": statistics.median(w[1] for w in windows),
        "vs_emulated": vs,
        "windows_ms": " ".join(f"{w[0] * 1000:.1f}" for w in windows),
    }


if __name__ == "__main__":
    main()
