"""The speed probe's own time: ``--speed auto``'s probe of a model and batch, as
``python -m fasthvae.train --amp`` runs it, once per round in a fresh process.

Each round starts one process that builds the run's configuration (``--amp``, the model's defaults),
probes it (``fasthvae.training.speed.probe``, its cache not read) and reports the probe's record: its
seconds, each stage's (the switches; each staged switch; the loaders, where ``--data`` gives the
training images), the seconds its candidates' first steps took (compilation included), how many
timed windows the stages ran of the most their rounds allow, and the choice. Inductor's on-disk
caches are used as they are (a machine's second probe of a model), or with ``--cold`` an empty
folder per process for its cache and its precompiled headers, which it keeps under the temporary
folder (``TMPDIR``) apart from the cache (a machine's first probe). Writes
``probe_<device>_<model>_b<batch>[_cold].{csv,md}``.

    python -m bench.bench_probe [--model deep] [--preset small] [--batch-size 32] [--data PATH]
                                [--rounds 3] [--cold]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.child import child_result
from bench.one_step import model_names
from bench.report import inductor_environment, write_report
from fasthvae.data import load_dataset
from fasthvae.hardware import machine
from fasthvae.training import speed
from fasthvae.training.config import TrainConfig, with_model_defaults
from fasthvae.training.distributed import DistInfo
from fasthvae.training.runtime import resolve_runtime

RESULT = "bench_probe result: "  # the line a child process reports on
CHILD_FLAGS = ("model", "preset", "batch_size", "data")  # passed on to it


def probe_config(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration as ``python -m fasthvae.train --amp`` builds it for this model."""
    config = TrainConfig(
        model=args.model, preset=args.preset, batch_size=args.batch_size, data=args.data, amp=True
    )
    return with_model_defaults(config)


def child(args: argparse.Namespace) -> None:
    """Probe once; print the record as one JSON line."""
    config = probe_config(args)
    rt = resolve_runtime(config, DistInfo())
    images = load_dataset(config.data).train.images if config.data else None
    record = speed.probe(config, rt, images) | {"device": rt.device.type}
    print(RESULT + json.dumps(record), flush=True)


def run_child(args: argparse.Namespace) -> dict:
    flags = [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in CHILD_FLAGS and v is not None
    ]
    command = [sys.executable, "-m", "bench.bench_probe", "--child", *flags]
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | ({"TORCHINDUCTOR_CACHE_DIR": cache, "TMPDIR": cache} if args.cold else {})
        return child_result(command, env, RESULT, "bench_probe: the probing process failed")


def windows(record: dict) -> tuple[int, int]:
    """(the windows the probe timed, the most its stages' rounds allow)."""
    timed = [c for c in record["candidates"] if "step_ms" in c]
    return sum(len(c["step_ms"]) for c in timed), speed.ROUNDS * len(timed)


def report_row(round_name: str, record: dict) -> dict:
    timed, most = windows(record)
    return {
        "round": round_name,
        "probe_s": record["probe_s"],
        **{f"{name}_s": s for name, s in record["stage_s"].items()},
        "first_steps_s": round(sum(c.get("first_step_s", 0.0) for c in record["candidates"]), 1),
        "windows": f"{timed} of {most}",
        "choice": speed.choice_text(record["choice"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deep", choices=["vae", "hvae", "deep"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data", default=None, help="as the trainer's --data; without it no loader stage")
    parser.add_argument("--rounds", type=int, default=3)
    cold = "an empty Inductor cache and precompiled headers in every process"
    parser.add_argument("--cold", action="store_true", help=cold)
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.rounds < 1 or args.batch_size < 1:
        parser.error("--rounds and --batch-size must be positive")
    records = []
    for r in range(args.rounds):
        records.append(run_child(args))
        print(
            f"round {r + 1}: probe {records[-1]['probe_s']} s, {speed.choice_text(records[-1]['choice'])}",
            flush=True,
        )
    rows = [report_row(str(r + 1), record) for r, record in enumerate(records)]
    numeric = [k for k in rows[0] if k.endswith("_s")]
    same = len({row["choice"] for row in rows}) == 1
    median = {k: statistics.median(row[k] for row in rows) for k in numeric}
    rows.append({"round": "median", **median, "windows": "", "choice": "the same" if same else "differs"})
    label, name = model_names(args)
    device = records[0]["device"]
    stem = Path(args.out) / f"probe_{device}_{name}_b{args.batch_size}{'_cold' if args.cold else ''}"
    caches = cold if args.cold else "Inductor's caches as they were"
    intro = (
        f"{machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. `--speed auto`'s probe of "
        f"{label} at batch {args.batch_size} with `--amp`, {args.rounds} rounds of one process each, "
        f"{caches}; {'the training images from --data' if args.data else 'no --data: no loader stage'}. "
        "Seconds: the probe, each stage (builds, first steps, warm-up steps, windows), the candidates' "
        "first steps (compilation included); windows timed of the most the rounds allow."
    ) + inductor_environment()
    header = ["round", "probe s", *[k.removesuffix("_s").replace("_", " ") + " s" for k in numeric[1:]],
              "windows", "choice"]  # fmt: skip

    def cells(row: dict) -> list[str]:
        return [row["round"], *[f"{row[k]:.1f}" for k in numeric], row["windows"], row["choice"]]

    print(write_report(rows, stem, header, cells, title="The speed probe's own time", intro=intro))


if __name__ == "__main__":
    main()
