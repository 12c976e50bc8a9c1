"""Train and evaluate every (row, seed) of the study under one protocol, resumably.

Each run lives in ``OUT/<row>/seed<k>/`` and is an ordinary trainer run folder. A run with a
``summary.json`` is finished and skipped; one with a checkpoint is resumed (mid-row); a run that
raises is recorded in its ``error.txt`` and the others still run. ``OUT/protocol.json`` pins the
protocol: rerunning with a different one is refused, while rows and seeds may be added (it keeps
the seeds asked of each row and every command that added runs).
"""

import contextlib
import csv
import fcntl
import json
import os
import statistics
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fasthvae.hardware import machine
from fasthvae.study.rows import ROWS, Row, select_rows
from fasthvae.train import TrainConfig, Trainer
from fasthvae.training.checkpoint import write_text_atomic
from fasthvae.training.distributed import wait_for_main
from fasthvae.training.preemption import Preempted

# The TrainConfig fields every row shares and a resumed study may not change.
PROTOCOL_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "likelihood",
    "data",
    "limit_train",
    "limit_test",
    "amp",
    "fid_samples",
    "fid_extractor",
)
# Fields of the runs that may differ between invocations (where and how fast they run).
RUNTIME_FIELDS = ("device", "loader", "compile", "workers", "fid_weights", "data_root", "checkpoint_every")


class StudyError(RuntimeError):
    """The study cannot run as asked (a different protocol in --out, bad rows); the message says why."""


@dataclass
class Run:
    """One (row, seed): where it lives and how far it got."""

    row: Row
    seed: int
    folder: Path
    status: str = "pending"  # pending, training, done, failed
    summary: dict | None = None
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    measured: dict | None = None  # an imported run: its numbers from another table (no folder)
    source: str | None = None  # an imported run: the command that made that table


def run_folder(out: Path, row: str, seed: int) -> Path:
    return out / row / f"seed{seed}"


def read_run(out: Path, row: Row, seed: int) -> Run:
    """The state of one run from its folder (summary, metrics, error)."""
    folder = run_folder(out, row.name, seed)
    run = Run(row, seed, folder)
    if (folder / "metrics.csv").is_file():
        with open(folder / "metrics.csv") as f:
            run.history = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        run.status = "training"
    if (folder / "summary.json").is_file():
        run.summary = json.loads((folder / "summary.json").read_text())
        run.status = "done"
    elif (folder / "error.txt").is_file():
        run.error = (folder / "error.txt").read_text().strip().splitlines()[-1]
        run.status = "failed"
    return run


# A study.json run's fields that are no metric (its per-epoch metrics.csv rows are its "history").
RUN_FIELDS = ("seed", "status", "error", "imported_from", "history")


def import_table(path: Path, protocol: dict) -> tuple[list[Run], list[str], list[str]]:
    """The finished runs of another study's ``study.json`` made under the same protocol (a row that
    ran elsewhere): their measured numbers and per-epoch history (where the table kept it), without
    checkpoints; the rows left out (one whose config is not today's row of that name measured
    another model); the machines that trained them."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise StudyError(f"cannot read the study table {path}: {err}") from None
    if record.get("protocol") != protocol:
        raise StudyError(f"{path} was made under another protocol than --out's; its runs cannot be pooled")
    runs, left_out = [], []
    for name, entry in record["rows"].items():
        if name not in ROWS or dict(ROWS[name].config) != entry["config"]:
            left_out.append(name)
            continue
        for r in entry["runs"]:
            if r["status"] == "done":
                measured = {k: v for k, v in r.items() if k not in RUN_FIELDS}
                source = r.get("imported_from", " && ".join(record.get("commands") or [record["command"]]))
                history = r.get("history", [])
                folder = Path(path).parent
                runs.append(
                    Run(
                        ROWS[name],
                        r["seed"],
                        folder,
                        "done",
                        history=history,
                        measured=measured,
                        source=source,
                    )
                )
    return runs, left_out, record.get("machines") or machine_lines(record.get("machine", ""))


def machine_lines(joined: str) -> list[str]:
    """The machines of a study table's one-line ``machine`` (tables that kept no list): each one's
    line is ``CPU..., GPU...; torch VERSION``, so a part that starts with ``torch `` ends a machine."""
    lines: list[str] = []
    for part in filter(None, joined.split("; ")):
        if part.startswith("torch ") and lines and "; torch " not in lines[-1]:
            lines[-1] += f"; {part}"
        else:
            lines.append(part)
    return lines


def pool(own: list[Run], imported: list[Run]) -> list[Run]:
    """``own`` runs, with imported ones for the (row, seed) that ``own`` has not finished, in the rows'
    registration order."""
    done = {(r.row.name, r.seed) for r in own if r.status == "done"}
    runs = {(r.row.name, r.seed): r for r in own}
    runs |= {(r.row.name, r.seed): r for r in imported if (r.row.name, r.seed) not in done}
    order = list(ROWS)
    return sorted(runs.values(), key=lambda r: (order.index(r.row.name), r.seed))


def read_protocol(out: Path) -> dict:
    """``OUT/protocol.json``: the protocol of the study in ``out``, the seeds asked of each row
    (``runs``), every command that added runs (``commands``, in order) and the training machines.
    A record from before ``runs`` asked every seed of every row and kept only its first command."""
    path = out / "protocol.json"
    if not path.is_file():
        raise StudyError(f"{out} holds no study (no protocol.json)")
    record = json.loads(path.read_text())
    if "runs" not in record:
        seeds = record.pop("seeds")
        record["runs"] = {row: list(seeds) for row in record.pop("rows")}
        record["commands"] = [record.pop("command")]
    return record


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.lock`` while training: a second study on the same folder is refused (the lock
    goes with the process, also when it is killed)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StudyError(
                f"another fasthvae.study (pid {f.read().strip() or '?'}) is running on {out}; "
                "--report-only rewrites its tables meanwhile"
            ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def check_protocol(out: Path, protocol: dict, rows: list[str], seeds: list[int], command: str) -> dict:
    """Write ``OUT/protocol.json``, or check it against ``protocol`` and add these rows' seeds, this
    command and this machine (the one that trains now) to it."""
    path = out / "protocol.json"
    record = {"protocol": protocol, "runs": {}, "commands": []}
    if path.is_file():
        record = read_protocol(out)
        before = record["protocol"]
        differ = [
            f"{k}: {before.get(k)!r} there, {v!r} asked" for k, v in protocol.items() if before.get(k) != v
        ]
        if differ:
            listed = "; ".join(differ)
            raise StudyError(
                f"{out} holds a study with another protocol ({listed}); rerun with its settings to "
                "resume it, or pick another --out"
            )
    for row in rows:
        record["runs"][row] = sorted(set(record["runs"].get(row, [])) | set(seeds))
    record["commands"] += [command] if command not in record["commands"] else []
    record["machines"] = [*(m for m in record.get("machines", []) if m != machine()), machine()]
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(record, indent=2) + "\n", path)
    return record


def run_config(out: Path, row: Row, seed: int, shared: dict, budget: float | None = None) -> TrainConfig:
    """The trainer config of one run: the shared protocol and runtime, the row's own fields, the seed.

    A row with a ``budget_row`` trains for ``budget`` minutes when given (that row ran elsewhere),
    else for the training time of the budget row's run in ``out``."""
    folder = run_folder(out, row.name, seed)
    fields = {**shared, **row.config, "seed": seed, "out": str(folder)}
    if row.budget_row is not None:
        fields["time_limit"] = budget if budget is not None else budget_minutes(out, row, seed)
    return TrainConfig(**fields, resume=(folder / "checkpoint.pt").is_file())


def budget_minutes(out: Path, row: Row, seed: int) -> float:
    """The training time of ``row.budget_row``'s finished run with this seed, in minutes: its epochs
    times its median epoch time (robust to an epoch slowed by other work on the machine)."""
    budget = read_run(out, select_rows([row.budget_row])[0], seed)
    if budget.status != "done":
        raise StudyError(
            f"row {row.name} trains for the time of row {row.budget_row}, seed {seed}, which has not "
            f"finished: run it first (--rows {row.budget_row},{row.name})"
        )
    seconds = [r["seconds"] for r in budget.history]
    return len(seconds) * statistics.median(seconds) / 60


def train_run(
    out: Path,
    row: Row,
    seed: int,
    shared: dict,
    on_epoch: Callable[[dict], None] | None = None,
    budget: float | None = None,
) -> Run:
    """Train and evaluate one run to its end (resuming it if begun); failures land in ``error.txt``."""
    folder = run_folder(out, row.name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.txt").unlink(missing_ok=True)
    # Every run compiles its own model through the same Objective.forward: a fresh cache per run
    # keeps their graphs from adding up to dynamo's recompile limit (past it, runs go eager).
    torch._dynamo.reset()
    try:
        config = run_config(out, row, seed, shared, budget)
        Trainer(config, given=set(asdict(config))).run(on_epoch)
    except Preempted:  # a signal stops the whole study (the run saved where it was)
        raise
    except Exception:  # a failing row is reported, the study goes on
        write_text_atomic(traceback.format_exc(), folder / "error.txt")
    wait_for_main()  # with DDP: the next run's collectives start after rank 0's evaluation
    return read_run(out, row, seed)


def plan(out: Path, asked: dict[str, list[int]]) -> list[Run]:
    """Every (row, seed) asked for (``asked[row]``: that row's seeds), seed-major (the rows of the
    lowest seed first), with its state."""
    seeds = sorted({seed for row_seeds in asked.values() for seed in row_seeds})
    rows = select_rows(list(asked))
    return [read_run(out, row, seed) for seed in seeds for row in rows if seed in asked[row.name]]
