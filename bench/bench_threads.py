"""The training step over the machine's cores: its serial and parallel parts (Amdahl's law), at one
batch size or several (whether the serial part grows with the batch or is the step's own).

Each round starts one process per thread count of ``--threads`` and batch size of ``--batch-sizes``
(the order alternating between rounds), each with ``OMP_NUM_THREADS`` and torch's threads set to its
count. A process builds the trainer's step as ``python -m fasthvae.train --amp`` runs it with every
speed switch on (compile, channels_last, the fused AdamW, the deep model's oneDNN convolutions where
they can run; freed memory kept), warms it up on one batch of the training set, times ``--windows``
windows of ``--steps`` steps and then an fp32 sgemm (2048^2) at its thread count. Inductor compiles
each thread count's kernels for that count; its on-disk caches make a thread count's later processes
start warm.

The step's median times T(n) are fitted with T(n) = S + P / n by least squares: P is the time one
core spends in work the cores share, S the time no added core shortens (Python and dispatch,
allocation, kernels too small to split, threads waiting on each other). The report gives, per
thread count, the median ms per step, the speed-up over the first count (median of the per-round
ratios), GFLOP/s (FLOPs per image counted once on the eager step, as ``bench/bench_train.py``
counts them) and its share of that count's sgemm peak; then S and P, and the step at the most
threads were S zero: the ceiling that removing overhead alone can reach with the kernels as they
are (where more threads were not faster, the report says so instead).

A second fit counts the cores the machine gives an sgemm: c(n) = n0 x sgemm(n) / sgemm(n0), n0 the
fewest threads, in place of n. A virtual machine's second core can give an sgemm much less than a
second core's speed, at some hours and not at others (why is not visible from inside it), and the
first fit counts that shortfall in S although no change to the step could remove it; against c(n),
S is what the step loses beyond what a compute-bound kernel loses on the same cores at that time,
if the step's kernels scale as the sgemm does. These rows come once per batch size of ``--batch-sizes``.
Writes ``threads_cpu_<model>_b<batch>[-<batch>...].{csv,md}``.

    python -m bench.bench_threads [--model deep] [--preset small] [--batch-size 32 | --batch-sizes 16 32]
                                  [--threads 1 2] [--rounds 3] [--data PATH]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_train import count_scale
from bench.child import child_result
from bench.machine_scale import sgemm_gflops
from bench.one_step import add_step_arguments, model_names, one_batch_step, step_config
from bench.report import inductor_environment, write_report
from fasthvae.hardware import machine
from fasthvae.train import Trainer

RESULT = "bench_threads result: "  # the line a child process reports on
CHILD_FLAGS = ("model", "preset", "batch_size", "data", "warmup", "steps", "windows")  # passed on to it


def child(args: argparse.Namespace) -> None:
    """Time the step at this process's thread count; print one JSON line."""
    torch.set_num_threads(args.child)
    with tempfile.TemporaryDirectory() as tmp:
        step, _ = one_batch_step(Trainer(step_config(args, tmp)))
        for _ in range(args.warmup):
            step()
        windows = []
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            windows.append((time.perf_counter() - start) / args.steps)
    sgemm = sgemm_gflops(torch.device("cpu"))
    print(RESULT + json.dumps({"threads": args.child, "windows": windows, "sgemm": sgemm}), flush=True)


def run_child(args: argparse.Namespace, threads: int, batch: int) -> dict:
    given = vars(args) | {"batch_size": batch}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in given.items() if k in CHILD_FLAGS and v is not None]
    command = [sys.executable, "-m", "bench.bench_threads", f"--child={threads}", *flags]
    if not args.compile:
        command.append("--no-compile")
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    failed = f"bench_threads: the {threads}-thread process at batch {batch} failed"
    return child_result(command, env, RESULT, failed)


def amdahl_fit(cores: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (S, P) of seconds = S + P / cores (thread counts, or the cores an sgemm got)."""
    xs = [1 / n for n in cores]
    mx, my = statistics.fmean(xs), statistics.fmean(seconds)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("Amdahl's fit needs at least two different thread counts")
    p = sum((x - mx) * (y - my) for x, y in zip(xs, seconds, strict=True)) / sxx
    return my - p * mx, p


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    default_batch = parser.get_default("batch_size")
    parser.set_defaults(batch_size=None)  # that default unless given, so that giving both flags is an error
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="several batch sizes in one run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="steps per window")
    parser.add_argument("--windows", type=int, default=5, help="windows per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    counts = sorted(set(args.threads))
    if args.batch_sizes and args.batch_size is not None:
        parser.error("give --batch-size or --batch-sizes, not both")
    batches = sorted(set(args.batch_sizes or [args.batch_size or default_batch]))
    if len(counts) < 2 or counts[0] < 1:
        parser.error("--threads needs two or more different positive counts")
    if batches[0] < 1:
        parser.error("batch sizes must be positive")
    args.batch_size = batches[-1]  # the eager step that counts the FLOPs per image
    with tempfile.TemporaryDirectory() as tmp:
        flops_per_image = count_scale(step_config(args, tmp, fast=False)).flops_per_image
    pairs = [(b, n) for b in batches for n in counts]
    runs: dict[tuple[int, int], list[dict]] = {pair: [] for pair in pairs}
    for r in range(args.rounds):
        for b, n in pairs[:: 1 if r % 2 == 0 else -1]:
            runs[b, n].append(run_child(args, n, b))
            median_ms = 1000 * statistics.median(runs[b, n][-1]["windows"])
            print(f"round {r + 1}: batch {b}, {n} threads {median_ms:.1f} ms", flush=True)
    label, name = model_names(args)
    rows = [
        {"batch": b} | row
        for b in batches
        for row in report_rows({n: runs[b, n] for n in counts}, flops_per_image, b)
    ]
    stem = Path(args.out) / f"threads_cpu_{name}_b{'-'.join(map(str, batches))}"
    intro = (
        f"{machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The trainer's step with every "
        f"speed switch on (`--amp`), {label}, batch {', '.join(map(str, batches))}, one batch; "
        f"{args.rounds} rounds of one process per thread count and batch (order alternating), each "
        f"{args.windows} windows of {args.steps} steps after {args.warmup} warm-up steps; "
        f"{flops_per_image / 1e6:.1f} MFLOP per image (eager step, forward and backward). Fit: T(n) = S + "
        "P / n by least squares on the medians of each batch, and T = S + P / c(n) with c(n) the cores "
        "the sgemm got, n0 x sgemm(n) / sgemm(n0) (n0 the fewest threads)."
    ) + inductor_environment()
    header = [
        "batch", "threads", "ms / step (median)", "speed-up (rounds)", "GFLOP/s", "sgemm peak GFLOP/s",
        "of sgemm peak",
    ]  # fmt: skip

    def cells(row: dict) -> list[str]:
        if row["ms_per_step"] is None:
            return [str(row["batch"]), row["threads"], "—", "", "—", f"{row['sgemm_gflops']:.1f}", "—"]
        return [str(row["batch"]), row["threads"], f"{row['ms_per_step']:.1f}", row["speedup"],
                f"{row['gflops']:.1f}", f"{row['sgemm_gflops']:.1f}",
                f"{row['share_of_sgemm']:.0%}"]  # fmt: skip

    title = "The training step over the machine's cores"
    print(write_report(rows, stem, header, cells, title=title, intro=intro))


def report_rows(runs: dict[int, list[dict]], flops_per_image: float, batch: int) -> list[dict]:
    """One row per thread count, then each fit's (on the thread counts, on the sgemm's cores): S, and
    the step at the most threads were S zero."""
    counts = sorted(runs)
    medians = {n: statistics.median(statistics.median(run["windows"]) for run in runs[n]) for n in counts}
    peaks = {n: statistics.median(run["sgemm"] for run in runs[n]) for n in counts}

    def row(threads: str, seconds: float | None, peak: float, speedup: str = "") -> dict:
        gflops = None if seconds is None else flops_per_image * batch / seconds / 1e9
        return {"threads": threads, "ms_per_step": None if seconds is None else 1000 * seconds,
                "speedup": speedup, "gflops": gflops, "sgemm_gflops": peak,
                "share_of_sgemm": None if gflops is None else gflops / peak}  # fmt: skip

    rows = []
    for n in counts:
        ratios = [
            statistics.median(first["windows"]) / statistics.median(run["windows"])
            for first, run in zip(runs[counts[0]], runs[n], strict=True)
        ]
        faster = f"{statistics.median(ratios):.2f}x ({sum(r > 1 for r in ratios)}/{len(ratios)})"
        rows.append(row(str(n), medians[n], peaks[n], faster if n != counts[0] else ""))
    most, times = counts[-1], [medians[n] for n in counts]

    def fit_row(name: str, cores: list[float]) -> dict:
        serial, parallel = amdahl_fit(cores, times)
        fit = f"{name}: S = {1000 * serial:.1f} ms, P = {1000 * parallel:.1f} ms"
        if parallel <= 0:  # more threads were not faster (a loaded machine, or a step too small to share)
            return row(f"{fit}: more threads were not faster", None, peaks[most])
        return row(f"{fit}; at {most}, S zero", parallel / cores[-1], peaks[most])

    rows.append(fit_row("fit", counts))
    cores = [counts[0] * peaks[n] / peaks[counts[0]] for n in counts]
    if cores[-1] > cores[0]:
        rows.append(fit_row(f"fit on the sgemm's cores ({cores[-1]:.2f} at {most})", cores))
    else:
        no_gain = "fit on the sgemm's cores: the sgemm was not faster on more threads"
        rows.append(row(no_gain, None, peaks[most]))
    return rows


if __name__ == "__main__":
    main()
