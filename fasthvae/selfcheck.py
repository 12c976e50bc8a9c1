"""The GPU self-check: everything that needs a GPU, in one call of at most ~10 minutes.

    python -m fasthvae.selfcheck OUT [--minutes 10] [--data cifar10.npz] [--no-build]
    bash scripts/gpu_check.sh OUT

On a CUDA machine it builds the CUDA kernels for the GPU present (against the torch it finds),
runs every test marked ``gpu`` (each kernel backend on CUDA against the float64 reference for every
dtype and reduction, Philox noise across backends, torch.compile fullgraph on CUDA, the resident and
DALI loaders on CUDA, fp16 with the GradScaler, one short run per model with every speed switch,
the sync-free step under ``torch.cuda.set_sync_debug_mode("error")``, NCCL DDP with two GPUs), the
Triton kernels compiled on CUDA, the three benchmarks on the GPU, and writes ``OUT/report.md`` with
the benchmark CSVs and Markdown beside it. What a missing package prevents is skipped with the
reason. Without a GPU it says so and exits 1.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class Budget:
    """The wall-clock budget shared by the steps."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def run_step(name: str, cmd: list[str], budget: Budget, cap: float, env: dict | None = None) -> dict:
    """One step as a subprocess within ``min(cap, what the budget has left)`` seconds."""
    limit = min(cap, budget.left())
    start = time.monotonic()
    if limit < 5:
        return {"name": name, "status": "not run (out of time)", "seconds": 0.0, "tail": ""}
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env={**os.environ, **(env or {})}
        )
        status = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        status, output = f"FAILED (over {limit:.0f} s)", f"{err.stdout or ''}{err.stderr or ''}"
    tail = "\n".join(output.strip().splitlines()[-25:])
    print(f"fasthvae.selfcheck: {name}: {status} ({time.monotonic() - start:.0f} s)", flush=True)
    return {"name": name, "status": status, "seconds": time.monotonic() - start, "tail": tail}


def steps(out: Path, data: str | None, build: bool) -> list[tuple[str, list[str], float, dict]]:
    """(name, command, cap in seconds, extra environment) of every step, in order."""
    py = sys.executable
    major, minor = torch.cuda.get_device_capability()
    gpu_env = {"TRITON_INTERPRET": "0"}
    plan = []
    if build:
        build_env = {"FASTHVAE_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}
        build_env["MAX_JOBS"] = str(os.cpu_count() or 4)
        plan.append(
            (
                "build the CUDA kernels for this GPU",
                [py, "setup.py", "-q", "build_ext", "--inplace"],
                240,
                build_env,
            )
        )
    plan.append(("environment", [py, "-m", "fasthvae.cli", "env"], 30, gpu_env))
    plan.append(
        ("tests marked gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 240, gpu_env)
    )
    kernels = ["tests/test_ops_kernels.py", "tests/test_ops_api.py", "-k", "triton or cuda"]
    plan.append(
        (
            "Triton compiled on CUDA",
            [py, "-m", "pytest", "-q", *kernels, "-p", "no:cacheprovider"],
            150,
            gpu_env,
        )
    )
    bench = out / "bench"
    plan.append(
        ("bench_ops", [py, "bench/bench_ops.py", "--device", "cuda", "--out", str(bench)], 90, gpu_env)
    )
    data_args = ["--data", data] if data else []
    plan.append(
        (
            "bench_train",
            [py, "bench/bench_train.py", "--device", "cuda", *data_args, "--out", str(bench)],
            120,
            gpu_env,
        )
    )
    plan.append(
        (
            "bench_loader",
            [py, "bench/bench_loader.py", "--device", "cuda", *data_args, "--out", str(bench)],
            60,
            gpu_env,
        )
    )
    return plan


def write_report(out: Path, results: list[dict], seconds: float) -> Path:
    lines = ["# fasthvae GPU self-check", ""]
    lines.append(
        f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
        f"{torch.cuda.device_count()} visible; torch {torch.__version__}; {seconds:.0f} s in all."
    )
    lines += ["", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} |" for r in results]
    for r in results:
        lines += ["", f"## {r['name']}", "", "```", r["tail"], "```"]
    for table in sorted((out / "bench").glob("*.md")):
        lines += ["", f"## {table.name}", "", table.read_text()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fasthvae.selfcheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, help="folder for report.md and the benchmark files")
    p.add_argument("--minutes", type=float, default=10.0, help="the whole check's budget")
    p.add_argument("--data", default=os.environ.get("FASTHVAE_DATA"), help="CIFAR-10 .npz for the benchmarks")
    p.add_argument("--no-build", dest="build", action="store_false", help="use the extension as built")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "fasthvae.selfcheck: no CUDA GPU is visible to torch (torch.cuda.is_available() is False), "
            "so there is nothing to check here: run it on a GPU machine",
            file=sys.stderr,
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    budget, start = Budget(args.minutes), time.monotonic()
    results = [
        run_step(name, cmd, budget, cap, env)
        for name, cmd, cap, env in steps(args.out, args.data, args.build)
    ]
    report = write_report(args.out, results, time.monotonic() - start)
    print(f"fasthvae.selfcheck: wrote {report}")
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
