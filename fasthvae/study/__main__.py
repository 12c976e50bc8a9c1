"""Reproduce the study's table in one command: every row trained and evaluated under one protocol.

    python -m fasthvae.study --data cifar10.npz --epochs 30 --seeds 0 1 --fid-samples 5000 --amp
    torchrun --nproc_per_node 2 -m fasthvae.study ...      # each run with DDP, rank 0 writes

Rows (``--rows``, default the study's three): vae, hvae-beta, hvae-alpha-beta. Each (row, seed) is
a trainer run in OUT/<row>/seed<k>/. Rerunning the command skips finished runs and resumes
unfinished ones (mid-row too); a failing run is reported and the others still run. Writes, as it
goes: OUT/study.md, study.csv, study.json, study.png and samples.png. A second study on the same
OUT is refused while one runs; --report-only rewrites the outputs from OUT and trains nothing.
"""

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

from fasthvae.data import load_dataset
from fasthvae.study import plots
from fasthvae.study.report import write_tables
from fasthvae.study.rows import BITS_PER_DIM_TARGET, ROWS, STUDY_ROWS, select_rows
from fasthvae.study.runner import (
    PROTOCOL_FIELDS,
    RUNTIME_FIELDS,
    Run,
    StudyError,
    check_protocol,
    import_table,
    plan,
    pool,
    read_protocol,
    study_lock,
    train_run,
)
from fasthvae.training.config import add_options
from fasthvae.training.distributed import DistInfo, init_distributed, shutdown
from fasthvae.training.preemption import PREEMPTED_EXIT, Preempted

# The study's protocol where it differs from a single run's defaults: its likelihood, and FID.
STUDY_DEFAULTS = {"likelihood": "bernoulli", "fid_samples": 10000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fasthvae.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", default=",".join(STUDY_ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    add_options(p, PROTOCOL_FIELDS + RUNTIME_FIELDS, STUDY_DEFAULTS)
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        metavar="MINUTES",
        help="training time of the rows that train for another row's time (deep: the vae run's), "
        "when that row ran elsewhere; default: measured from its run in --out",
    )
    p.add_argument(
        "--import-table",
        type=Path,
        default=None,
        metavar="STUDY_JSON",
        help="pool the finished runs of another study.json made under the same protocol (rows that "
        "ran elsewhere) into the tables, for the (row, seed) that --out has not finished",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the tables and PNGs from what --out holds, train nothing (also while it trains)",
    )
    return p.parse_args(argv)


class Study:
    """The runs of one invocation, the reports they feed, and the progress bar over all epochs."""

    def __init__(self, args: argparse.Namespace, command: str, dist: DistInfo) -> None:
        self.args, self.dist = args, dist
        self.out: Path = args.out
        self.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        select_rows(self.rows)  # unknown names fail before anything runs
        self.protocol = {k: getattr(args, k) for k in PROTOCOL_FIELDS}
        self.shared = self.protocol | {k: getattr(args, k) for k in RUNTIME_FIELDS}
        self.asked = {row: list(args.seeds) for row in self.rows}
        self.all_runs, self.commands = self.asked, [command]
        self.machines: list[str] | None = None
        if args.report_only:
            record = read_protocol(self.out)
            self.protocol = record["protocol"]
        elif dist.is_main:
            record = check_protocol(self.out, self.protocol, self.rows, args.seeds, command)
        else:
            return
        self.all_runs, self.commands = record["runs"], record["commands"]
        self.machines = record.get("machines")

    def report(self, pictures: bool = True) -> list:
        """Rewrite the tables (and, when asked, the PNGs) from every run of the study in --out, with
        the runs of --import-table that --out has not finished."""
        if not self.dist.is_main:
            return []
        runs, notes, machines = plan(self.out, self.all_runs), [], self.machines
        if self.args.import_table is not None:
            imported, left_out, elsewhere = import_table(self.args.import_table, self.protocol)
            runs = pool(runs, imported)
            machines = list(dict.fromkeys([*(machines or []), *elsewhere]))
            notes = [f"Not imported (its row has changed since): {', '.join(left_out)}."] if left_out else []
        claims = write_tables(self.out, runs, self.protocol, self.commands, machines, notes)
        if pictures:
            plots.save_curves(runs, self.out / "study.png")
            plots.save_bits_per_dim(runs, self.out / "bits_per_dim.png", target=BITS_PER_DIM_TARGET)
            test = load_dataset(self.protocol["data"], root=self.args.data_root).test.images
            plots.save_samples(runs, test, self.out / "samples.png")
        return claims

    def run(self) -> int:
        runs = plan(self.out, self.asked)
        todo = [r for r in runs if r.status != "done"]

        def epochs(run: Run) -> int:
            return run.row.epochs(self.args.epochs)

        bar = tqdm(
            total=sum(epochs(r) for r in runs),
            initial=sum(epochs(r) if r.status == "done" else len(r.history) for r in runs),
            desc="study",
            unit="epoch",
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        self.report()
        failed = 0
        for i, run in enumerate(todo):
            bar.set_description(f"study [{i + 1}/{len(todo)}] {run.row.name} seed {run.seed}")

            def on_epoch(_row: dict) -> None:
                bar.update(1)
                self.report(pictures=False)

            done = train_run(self.out, run.row, run.seed, self.shared, on_epoch, self.args.budget_minutes)
            bar.update(epochs(run) * (done.status == "done") - (len(done.history) - len(run.history)))
            if done.status == "failed":
                failed += 1
                tqdm.write(f"fasthvae.study: {run.row.name} seed {run.seed} failed: {done.error}")
            self.report()
        bar.close()
        if self.dist.is_main:
            for claim in self.report(pictures=False):
                print(f"claim {claim.name}: {claim.holds} — {claim.detail}")
            print(f"fasthvae.study: wrote {self.out / 'study.md'}", flush=True)
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m fasthvae.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    dist = init_distributed(args.device or "cpu")
    try:
        study = Study(args, command, dist)
        if args.report_only:
            study.report()
            print(f"fasthvae.study: wrote {args.out / 'study.md'}")
            return 0
        with study_lock(args.out) if dist.is_main else contextlib.nullcontext():
            return study.run()
    except Preempted as stop:
        print(f"fasthvae.study: {stop}; rerun the same command to go on", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except (StudyError, ValueError) as err:
        print(f"fasthvae.study: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown(dist)


if __name__ == "__main__":
    sys.exit(main())
