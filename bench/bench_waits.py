"""Where the training step's threads wait, and what the main thread runs meanwhile (Linux ``perf``).

Builds the trainer's step as ``bench/one_step.py`` does (every speed switch on, ``--amp``, one
batch of the training set), warms it up, then samples every thread of the process with ``perf
record`` for ``--seconds`` while the step runs, and reads the samples back with ``perf script``. Each
sample is classed by the code it lies in (the library's path: Inductor's kernels, oneDNN's JIT
kernels, the OpenMP runtime, Python, libc, the Linux kernel, ...). A worker thread waits while it
is in the OpenMP runtime. Each sample of the main thread is matched with the nearest sample of
every worker within ``--match-us``; the main thread ran alone where every matched worker waited.
Reports each thread kind's samples by class, the share of the main thread's samples in which it ran
alone, and what it ran then: the part of the step that a second core does not shorten. Writes
``waits_cpu_<model>_b<batch>.{csv,md}``.

Needs ``perf`` (linux-tools) and leave to record this process (root, or
``/proc/sys/kernel/perf_event_paranoid`` at 1 or below). oneDNN names its JIT kernels for perf
(``ONEDNN_JIT_PROFILE=1``, set here before oneDNN starts); other code without a file is classed as
unknown.

    python -m bench.bench_waits [--model deep] [--preset small] [--batch-size 32] [--seconds 15]
                                [--data PATH]
"""

import argparse
import bisect
import collections
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.one_step import add_step_arguments, model_names, one_batch_step, step_config
from bench.report import inductor_environment, write_report
from fasthvae.hardware import machine
from fasthvae.train import Trainer

# Class of a sample by its symbol and the file its instruction lies in (``symbol (path)``): the first
# pattern that matches. Sleef's vector math is compiled into libtorch_cpu but called by Inductor's
# kernels and ATen's alike, so it has a class of its own.
PYTHON = r"\(.*(libpython[^/]*|libtorch_python\.so|/torch/_C[^/]*\.so|lib-dynload/.*|/python3?[.\d]*)\)$"
CLASSES = (
    ("OpenMP runtime (waiting, forking, joining)", r"\(.*lib[gi]omp[^/]*\.so[.\d]*\)$"),
    ("vector math (Sleef, libmvec, libm)", r"Sleef|\(.*lib(mvec|m)\.so[.\d]*\)$"),
    ("Inductor's kernels", r"\(.*torchinductor_[^/]*/.*\.so\)$"),
    ("oneDNN's JIT kernels", r"\(/tmp/perf-\d+\.map\)$|\(\[JIT\]"),
    ("oneDNN (library code)", r"\(.*libdnnl[^/]*\.so[.\d]*\)$"),
    ("fasthvae's C++ ops", r"\(.*(fasthvae[^/]*/[^/]*|/fasthvae/_C[^/]*)\.so\)$"),
    ("ATen and c10", r"\(.*lib(torch_cpu|c10)\.so\)$"),
    ("Python and torch's bindings", PYTHON),
    ("libc (malloc, free, copies)", r"\(.*/libc\.so[.\d]*\)$"),
    ("Linux kernel (page faults, syscalls)", r"\(\[kernel"),
)
OPENMP = CLASSES[0][0]
UNKNOWN = "unknown"
SAMPLE = re.compile(r"^\s*(\d+)/(\d+)\s+(\d+\.\d+):\s+\S+\s+(.*\(.*\))\s*$")


@dataclass(frozen=True)
class Sample:
    pid: int
    tid: int
    time: float
    kind: str


def code_class(where: str) -> str:
    """The class of a sample at ``where``, ``symbol (path)`` as perf script writes it."""
    for name, pattern in CLASSES:
        if re.search(pattern, where):
            return name
    return UNKNOWN


def parse(lines: list[str]) -> list[Sample]:
    """``perf script -F pid,tid,time,ip,sym,dso`` lines (one per sample, no call chains)."""
    samples = []
    for line in lines:
        found = SAMPLE.match(line)
        if found:
            pid, tid, when, where = found.groups()
            samples.append(Sample(int(pid), int(tid), float(when), code_class(where)))
    return samples


def waits(samples: list[Sample], match_s: float) -> dict:
    """Each thread kind's samples by class; the main thread's samples in which every worker
    waited (each matched with the nearest sample of every worker within ``match_s``), by class."""
    by_thread: dict[int, list[Sample]] = collections.defaultdict(list)
    for s in samples:
        by_thread[s.tid].append(s)
    main = [s for s in samples if s.tid == s.pid]
    workers = [sorted(v, key=lambda s: s.time) for tid, v in by_thread.items() if v[0].pid != tid]
    if not main or not workers:
        raise SystemExit("bench_waits: perf recorded no samples of the main thread and a worker")
    times = [[s.time for s in w] for w in workers]
    alone, matched = collections.Counter(), 0
    for s in main:
        nearest = []
        for worker, at in zip(workers, times, strict=True):
            i = bisect.bisect_left(at, s.time)
            near = [j for j in (i - 1, i) if 0 <= j < len(at) and abs(at[j] - s.time) <= match_s]
            if near:
                nearest.append(worker[min(near, key=lambda j: abs(at[j] - s.time))].kind)
        if len(nearest) == len(workers):
            matched += 1
            if all(kind == OPENMP for kind in nearest):
                alone[s.kind] += 1
    return {
        "main": collections.Counter(s.kind for s in main),
        "workers": collections.Counter(s.kind for w in workers for s in w),
        "alone": alone,
        "matched": matched,
        "worker_threads": len(workers),
    }


def record(step, seconds: float, out: Path) -> list[str]:
    """Run ``step`` in a loop while ``perf record`` samples this process; the samples as text."""
    data = out / "perf.data"
    command = ["perf", "record", "-F", "1999", "-p", str(os.getpid()), "-o", str(data)]
    command += ["--", "sleep", str(seconds)]
    perf = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()
    threading.Thread(target=lambda: (perf.wait(), done.set()), daemon=True).start()
    steps = 0
    while not done.is_set():
        step()
        steps += 1
    if perf.returncode != 0 or not data.exists():
        raise SystemExit(f"bench_waits: perf record failed:\n{perf.stdout.read() if perf.stdout else ''}")
    print(f"{steps} steps sampled", flush=True)
    script = ["perf", "script", "-i", str(data), "-F", "pid,tid,time,ip,sym,dso", "-G"]
    return subprocess.run(script, capture_output=True, text=True, check=True).stdout.splitlines()


def report_rows(found: dict) -> list[dict]:
    main, workers, alone = found["main"], found["workers"], found["alone"]
    n_main, n_workers, n_alone = sum(main.values()), sum(workers.values()), sum(alone.values())
    names = [name for name, _ in CLASSES] + [UNKNOWN]
    names.sort(key=lambda name: -(main[name] + workers[name]))
    rows = [
        {
            "code": name,
            "main_thread": main[name] / n_main,
            "workers": workers[name] / n_workers,
            "main_alone": alone[name] / max(n_alone, 1),
        }
        for name in names
        if main[name] or workers[name]
    ]
    rows.append({"code": "all", "main_thread": 1.0, "workers": 1.0, "main_alone": 1.0})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--match-us", type=float, default=100.0)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("bench_waits needs Linux perf on the PATH (linux-tools); it is not installed here")
    if torch.get_num_threads() < 2:
        raise SystemExit("bench_waits: torch runs one thread here; there is no worker to wait")
    os.environ.setdefault("ONEDNN_JIT_PROFILE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        step, _ = one_batch_step(Trainer(step_config(args, tmp)))
        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        step()
        step_ms = 1000 * (time.perf_counter() - start)
        found = waits(parse(record(step, args.seconds, Path(tmp))), args.match_us / 1e6)
    rows = report_rows(found)
    n_main, n_workers = sum(found["main"].values()), sum(found["workers"].values())
    alone = sum(found["alone"].values()) / max(found["matched"], 1)
    label, name = model_names(args)
    stem = Path(args.out) / f"waits_cpu_{name}_b{args.batch_size}"
    intro = (
        f"{machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The trainer's step with every "
        f"speed switch on (`--amp`), {label}, batch {args.batch_size}, one batch, about {step_ms:.0f} ms a "
        f"step; `perf record -F 1999` for {args.seconds:.0f} s: {n_main} samples of the main thread, "
        f"{n_workers} of {found['worker_threads']} worker thread(s). **The main thread ran "
        f"alone (every worker in the OpenMP runtime) in {alone:.0%} of its samples** (each matched with "
        f"the nearest sample of every worker within {args.match_us:.0f} us). Columns: the share of each "
        "thread kind's samples in each kind of code, and of the main thread's samples while it ran alone."
    ) + inductor_environment()
    header = ["code", "main thread", "workers", "main thread, running alone"]

    def cells(row: dict) -> list[str]:
        return [row["code"], f"{row['main_thread']:.1%}", f"{row['workers']:.1%}", f"{row['main_alone']:.1%}"]

    title = "Where the training step's threads wait"
    print(write_report(rows, stem, header, cells, title=title, intro=intro))


if __name__ == "__main__":
    main()
