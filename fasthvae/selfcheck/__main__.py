"""``python -m fasthvae.selfcheck OUT [--rehearse]``: see :mod:`fasthvae.selfcheck`."""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fasthvae import selfcheck
from fasthvae.hardware import machine
from fasthvae.selfcheck.plan import BUDGET_S, OPTIONAL, missing_packages, plan
from fasthvae.selfcheck.rehearsal import copy_tree, hide_in_this_process, hiding_environment
from fasthvae.selfcheck.report import write_report
from fasthvae.selfcheck.steps import run_step

ROOT = Path(__file__).resolve().parents[2]


def synthetic_data(path: Path, train: int = 4096, test: int = 512) -> str:
    """Random CIFAR-shaped images for the benchmarks when no data set is given (speed only)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        x, xt = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (train, test))
        np.savez(
            path, x_train=x, y_train=np.zeros(train, np.int64), x_test=xt, y_test=np.zeros(test, np.int64)
        )
    return str(path)


def header(rehearse: bool, data_note: str, budget_s: float, caps: float) -> list[str]:
    if rehearse:
        where = f"CPU rehearsal (no GPU): {machine()}; optional packages hidden: {', '.join(OPTIONAL)}"
    else:
        cc = "".join(map(str, torch.cuda.get_device_capability()))
        gpus = torch.cuda.device_count()
        where = f"GPU: {torch.cuda.get_device_name()} (sm_{cc}), {gpus} visible; CPU: {machine()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        f"{where}  ",
        f"Python {platform.python_version()} (`{sys.executable}`), torch {torch.__version__}, "
        f"Triton {triton_version}  ",
        f"Budget {budget_s:.0f} s; the GPU steps' caps sum to {caps:.0f} s.  ",
        f"Data for the benchmarks: {data_note}.  ",
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fasthvae.selfcheck",
        description=selfcheck.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, help="folder for report.md, logs/ and the benchmark files")
    p.add_argument("--minutes", type=float, default=BUDGET_S / 60, help="the whole check's budget")
    p.add_argument("--data", default=os.environ.get("FASTHVAE_DATA"), help="CIFAR-10 .npz for the benchmarks")
    p.add_argument("--no-build", dest="build", action="store_false", help="use the extension as built")
    p.add_argument("--rehearse", action="store_true", help="the same steps on a CPU, with CPU stand-ins")
    args = p.parse_args(argv)
    if not args.rehearse and not torch.cuda.is_available():
        print(
            "fasthvae.selfcheck: no CUDA GPU is visible to torch (torch.cuda.is_available() is False), "
            "so there is nothing to check here: run it on a GPU machine (or rehearse it with --rehearse)",
            file=sys.stderr,
        )
        return 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    env, cwd = dict(os.environ), ROOT
    if args.rehearse:
        cwd = copy_tree(ROOT, out / "tree", with_extension=not args.build)
        env.update(hiding_environment(out / "hide", cwd, OPTIONAL))
        hide_in_this_process(out / "hide", OPTIONAL)
        arch = "9.0"  # the GPU machine's
    else:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    data_note = args.data or "none given: random CIFAR-shaped images (speed only)"
    data = args.data or synthetic_data(out / "data" / "synthetic.npz")
    where = {"data": data, "build": args.build, "arch": arch, "cpus": os.cpu_count() or 1}
    steps = plan(sys.executable, out, rehearse=args.rehearse, **where)
    on_gpu = plan(sys.executable, out, rehearse=False, **where)
    top = header(args.rehearse, data_note, 60 * args.minutes, sum(s.cap_s for s in on_gpu))
    missing, results = missing_packages(), []
    for step in steps:
        write_report(out, top, missing, results, running=step.name)
        result = run_step(step, cwd, out / "logs", deadline - time.monotonic(), env)
        results.append(result)
        line = f"fasthvae.selfcheck: {step.name}: {result.status} ({result.seconds:.0f} s) {result.counts()}"
        print(line, flush=True)
    report = write_report(out, top, missing, results)
    print(f"fasthvae.selfcheck: wrote {report}")
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
