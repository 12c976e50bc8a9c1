"""Whether a study row fits its time budget on this machine, without training the budget row.

A row with a ``budget_row`` (the deep rows: the ``vae`` run's training time with the same seed)
trains for at most that row's time; how many of its epochs fit depends on the machine, since the
rows' steps gain unequally from a CPU's ISA (wide convolutions against 16-channel ones). This
benchmark builds every row's trainer as ``python -m fasthvae.study`` would (the study's protocol
from the same options, the row's config, the switches ``--speed auto`` chooses for that row here:
its cache, else its probe), each on the full training set, in one process. Each row's first window
is untimed (compilation); then ``--rounds`` rounds time one window of every row, the order rotated
each round. A window is the trainer's own epoch loop (``EpochRun``: the loader, the step, the
records read back, the TensorBoard writer) over ``--window-seconds`` of steps. A row's training
time is predicted as its steps per run (its epochs x batches per epoch) times its seconds per step,
as the study counts it: the budget is the budget row's epochs times its median epoch (its
compilation not in it), while a budgeted row's time limit counts every epoch's seconds, so a
budgeted row's prediction adds its compilation (the first window's time over its steps at the
median pace). Against its budget row it is the share of that row's predicted time, per round (both
windows of a round ran under the same conditions), median over rounds. Not counted: the
evaluation after each epoch (the study's budget is of training time only).

    python -m bench.bench_budget --rows vae deep-z16-b16-e12-rp-klb-b09 --data cifar10.npz --amp
                                 [--rounds 5] [--window-seconds 20] [the study's protocol options]
"""

import argparse
import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from bench.bench_train import switches_of
from bench.report import write_report
from fasthvae.data import BatchLoader
from fasthvae.hardware import machine
from fasthvae.study.__main__ import STUDY_DEFAULTS
from fasthvae.study.rows import Row, select_rows
from fasthvae.study.runner import PROTOCOL_FIELDS, RUNTIME_FIELDS, run_config
from fasthvae.train import Trainer
from fasthvae.training import artifacts
from fasthvae.training.config import add_options
from fasthvae.training.loop import EpochRun


class Window:
    """The first ``steps`` batches of an epoch of ``loader``, as a loader (an epoch loop's window)."""

    def __init__(self, loader: BatchLoader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(iter(self.loader), len(self))


class RowRun:
    """One row's trainer and its timed windows (seconds per step)."""

    def __init__(self, row: Row, shared: dict, out: Path) -> None:
        self.row = row
        config = run_config(out, row, 0, shared, budget=math.inf if row.budget_row else None)
        self.trainer = Trainer(config, given=set(asdict(config)))
        self.tb = artifacts.TensorBoardLog(out / row.name, 0, 0) if self.trainer.rt.tensorboard else None
        self.windows: list[float] = []
        self.first_window_s = math.nan  # the untimed first window, compilation included
        self.batches = len(self.trainer.loader)
        self.steps_per_run = row.epochs(config.epochs) * self.batches

    def window(self, steps: int) -> float:
        """Seconds per step of one window of the trainer's epoch loop."""
        t, window = self.trainer, Window(self.trainer.loader, steps)
        run = EpochRun(t.state, t.step_fn, window, t.schedule, t.config, t.dist, t.skips,
                       t.rt.log_every, poll=lambda: (False, False), save=lambda: None,
                       on_step=self.tb.step if self.tb is not None else None)  # fmt: skip
        return run.run()["seconds"] / len(window)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_budget",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--rows", nargs="+", required=True, help="study rows; each one's budget row is added")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--window-seconds", type=float, default=20.0, help="length of a timed window")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    add_options(p, PROTOCOL_FIELDS + RUNTIME_FIELDS, STUDY_DEFAULTS)
    return p.parse_args(argv)


def with_budget_rows(names: list[str]) -> list[Row]:
    rows = select_rows(names)
    budget = [r.budget_row for r in rows if r.budget_row and r.budget_row not in names]
    return select_rows(list(dict.fromkeys(budget))) + rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = with_budget_rows(args.rows)
    shared = {k: getattr(args, k) for k in PROTOCOL_FIELDS + RUNTIME_FIELDS}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [RowRun(row, shared, Path(tmp)) for row in rows]
        lengths = []
        for run in runs:  # untimed: the first compiles, the second sets the window's length
            run.first_window_s = 3 * run.window(3)
            lengths.append(max(3, round(args.window_seconds / run.window(3))))
        for r in range(args.rounds):
            for i in [(r + k) % len(runs) for k in range(len(runs))]:
                runs[i].windows.append(runs[i].window(lengths[i]))
        for run in runs:
            run.close()
    by_name = {run.row.name: run for run in runs}
    table = [record(run, by_name.get(run.row.budget_row or "")) for run in runs]
    stem = args.out / f"budget_{runs[0].trainer.rt.device.type}_{'_'.join(args.rows)}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    intro = (
        f"{machine()}, {when}. "
        f"Each row's trainer as the study builds it (protocol: {args.epochs} epochs, batch "
        f"{args.batch_size}, {'`--amp`' if args.amp else 'fp32'}, loader {args.loader or 'the default'}); "
        f"{args.rounds} rounds of one window of each row's epoch loop, the order rotated. Predicted "
        "training time: steps per run x the median seconds per step, plus the compilation for a row "
        "with a budget (its time limit counts it; the budget, a median epoch, does not); the "
        "evaluations after each epoch not counted. The share of the budget row's: median over rounds."
    )
    header = ["row", "batch", "epochs", "steps / run", "median ms / step", "compilation s", "switches",
              "predicted training min", "share of the budget row's (rounds within)"]  # fmt: skip

    def cells(r: dict) -> list[str]:
        return [r["row"], str(r["batch"]), str(r["epochs"]), f"{r['steps_per_run']:,}",
                f"{r['ms_per_step']:.1f}", f"{r['compile_s']:.0f}", r["switches"],
                f"{r['predicted_minutes']:.1f}", r["share_of_budget"]]  # fmt: skip

    print(write_report(table, stem, header, cells, title="Study rows against their time budget", intro=intro))


def record(run: RowRun, budget: RowRun | None) -> dict:
    """A row's median step, compilation, predicted training time and share of its budget row's."""
    t = run.trainer
    step_s = statistics.median(run.windows)
    compile_s = max(0.0, run.first_window_s - 3 * step_s)
    counted_s = compile_s if run.row.budget_row else 0.0
    share = ""
    if budget is not None:
        shares = [
            (run.steps_per_run * w + counted_s) / (budget.steps_per_run * b)
            for w, b in zip(run.windows, budget.windows, strict=True)
        ]
        share = f"{statistics.median(shares):.3f} ({sum(s <= 1 for s in shares)}/{len(shares)})"
    return {
        "row": run.row.name,
        "batch": t.config.batch_size,
        "epochs": run.steps_per_run // run.batches,
        "steps_per_run": run.steps_per_run,
        "ms_per_step": 1000 * step_s,
        "compile_s": compile_s,
        "switches": switches_of(t),
        "predicted_minutes": (run.steps_per_run * step_s + counted_s) / 60,
        "share_of_budget": share,
        "windows_ms": " ".join(f"{1000 * w:.1f}" for w in run.windows),
    }


if __name__ == "__main__":
    main()
