"""The study's table: study.md, study.csv and study.json, from the runs' folders.

Reconstruction is the test set's BCE in nats per image (the study's loss; its own unit is not
stated) and squared error per image; every row is also given as a ratio to the VAE row, which
cancels the study's unknown units.
"""

import csv
import io
import json
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path

from fasthvae.hardware import machine
from fasthvae.study.claims import Claim, evaluate_claims
from fasthvae.study.rows import BASELINE
from fasthvae.study.runner import Run
from fasthvae.training.checkpoint import write_text_atomic

# Row config fields the label, the epochs clause or the curves already say; every other is printed.
_SHOWN_ELSEWHERE = {
    "model",
    "schedule",
    "preset",
    "layout",
    "width",
    "zdim",
    "epochs",
    "schedule_epochs",
    "test_every_epoch",
}
METRICS = ("recon_bce", "recon_mse", "neg_elbo", "neg_elbo_bits_per_dim", "fid")


def run_metrics(run: Run) -> dict[str, float]:
    """The measured numbers of a finished run (test metrics, FID, time, speed)."""
    if run.measured is not None:
        return dict(run.measured)
    if run.summary is None:
        return {}
    test = run.summary["test"]
    values = {k: test[k] for k in METRICS if k in test}
    if "fid" in run.summary:
        values["fid"] = run.summary["fid"]["fid"]
    values["epochs"] = run.summary.get("epochs", len(run.history))
    values["train_seconds"] = run.summary.get("train_seconds", sum(r["seconds"] for r in run.history))
    values["eval_seconds"] = run.summary.get("eval_seconds")
    if run.history:
        values["images_per_s"] = statistics.median(r["images_per_s"] for r in run.history)
    return {k: v for k, v in values.items() if v is not None}


def aggregate(runs: list[Run]) -> dict[str, dict]:
    """Per row: seeds done, status, and mean/sd/values of every metric over the finished seeds."""
    rows: dict[str, dict] = {}
    for run in runs:
        entry = rows.setdefault(run.row.name, {"row": run.row, "runs": [], "metrics": {}})
        entry["runs"].append(run)
    for entry in rows.values():
        done = [r for r in entry["runs"] if r.status == "done"]
        per_seed = [run_metrics(r) for r in done]
        for key in sorted({k for m in per_seed for k in m}):
            values = [m[key] for m in per_seed if key in m]
            entry["metrics"][key] = {
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
            }
    return rows


def _status(runs: list[Run], epochs: int) -> str:
    parts = []
    for run in runs:
        if run.status == "training" and len(run.history) >= epochs:
            parts.append(f"seed {run.seed}: trained, evaluating")
        elif run.status == "training":
            parts.append(f"seed {run.seed}: epoch {len(run.history)}/{epochs}")
        elif run.status == "failed":
            parts.append(f"seed {run.seed}: failed ({run.error})")
        elif run.status == "pending":
            parts.append(f"seed {run.seed}: pending")
    done = sum(r.status == "done" for r in runs)
    return f"{done}/{len(runs)} done" + (f" ({'; '.join(parts)})" if parts else "")


def _fmt(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "—"
    text = f"{stat['mean']:,.{digits}f}"
    return text + (f" ± {stat['sd']:,.{digits}f}" if stat["sd"] is not None else "")


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "—"


def _minutes(history: list[dict]) -> float:
    return sum(r["seconds"] for r in history) / 60


def _trained(run: Run) -> str | None:
    """How far a run trained: its epochs and minutes (an imported run's from its table's numbers)."""
    if run.measured is None:
        if not run.history:
            return None
        return f"seed {run.seed}: {len(run.history)} epochs in {_minutes(run.history):.1f} min"
    if "train_seconds" not in run.measured:
        return None
    epochs = f"{run.measured['epochs']:.0f} epochs in " if "epochs" in run.measured else ""
    return f"seed {run.seed}: {epochs}{run.measured['train_seconds'] / 60:.1f} min (imported)"


def _mean(entry: dict | None, key: str) -> float | None:
    stat = entry["metrics"].get(key) if entry else None
    return stat["mean"] if stat else None


def claim_values(runs: list[Run]) -> dict[str, dict[int, dict]]:
    values: dict[str, dict[int, dict]] = {}
    for run in runs:
        if run.status == "done":
            values.setdefault(run.row.name, {})[run.seed] = run_metrics(run)
    return values


def _study_table(command: str) -> str:
    """The study.json that a study command wrote: its ``--out`` (the last command's, of a chain)."""
    words = shlex.split(command.split(" && ")[-1])
    out = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--out"), "runs/study")
    home = str(Path.home())
    return f"{'~' + out[len(home) :] if out.startswith(home + '/') else out}/study.json"


def _imported(runs: list[Run]) -> list[str]:
    """The provenance of imported runs as a short table: row, seeds, the study table they came from
    (the full commands stay in study.json)."""
    seeds: dict[tuple[str, str], list[int]] = {}
    for run in runs:
        if run.source:
            seeds.setdefault((run.row.name, _study_table(run.source)), []).append(run.seed)
    if not seeds:
        return []
    lines = [
        "",
        "Runs imported from other studies made under this protocol (numbers only, no curves or samples; "
        "the commands that trained them are in study.json):",
        "",
        "| row | seeds | imported from |",
        "|---|---|---|",
    ]
    return lines + [f"| {row} | {', '.join(map(str, s))} | `{table}` |" for (row, table), s in seeds.items()]


def markdown(
    runs: list[Run], protocol: dict, commands: list[str], claims: list[Claim], machines: str, notes: list[str]
) -> str:
    rows = aggregate(runs)
    base = rows.get(BASELINE)
    fid = protocol["fid_samples"]
    lines = [
        "# The study, reproduced with fasthvae",
        "",
        *(f"Command: `{command}`  " for command in commands),
        f"Machine: {machines}  ",
        *(f"{note}  " for note in notes),
        f"Written: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        *_imported(runs),
        "",
        f"Protocol (every row): {protocol['limit_train'] or 'all'} training images, {protocol['epochs']} "
        f"epochs (the schedules' 100-epoch anchors stretched to {protocol['epochs']}), batch "
        f"{protocol['batch_size']}, AdamW lr {protocol['lr']:g}, likelihood {protocol['likelihood']}, "
        f"{'bf16 autocast where native' if protocol['amp'] else 'fp32'}; test metrics on "
        f"{protocol['limit_test'] or 'all 10,000'} test images; "
        + (
            f"FID of {fid:,} samples (T = 1) against the CIFAR-10 test split, extractor "
            f"{protocol['fid_extractor']}."
            if fid
            else "no FID."
        ),
        "",
        "| row | runs | recon BCE (nats/img) | recon MSE (/img) | -ELBO (nats/img) | FID | "
        "recon / VAE | FID / VAE | study recon | study FID | study recon / VAE | study FID / VAE | "
        "train time / run | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    study_base = base["row"] if base else None
    for entry in rows.values():
        row, m = entry["row"], entry["metrics"]
        train = m.get("train_seconds")
        speed = m.get("images_per_s")
        lines.append(
            "| "
            + " | ".join(
                [
                    row.label,
                    _status(entry["runs"], row.epochs(protocol["epochs"])),
                    _fmt(m.get("recon_bce")),
                    _fmt(m.get("recon_mse")),
                    _fmt(m.get("neg_elbo")),
                    _fmt(m.get("fid")),
                    _ratio(_mean(entry, "recon_bce"), _mean(base, "recon_bce")),
                    _ratio(_mean(entry, "fid"), _mean(base, "fid")),
                    f"{row.study_recon:,}" if row.study_recon else "—",
                    f"{row.study_fid}" if row.study_fid else "—",
                    _ratio(row.study_recon, study_base.study_recon if study_base else None),
                    _ratio(row.study_fid, study_base.study_fid if study_base else None),
                    f"{train['mean'] / 60:.0f} min" if train else "—",
                    f"{speed['mean']:,.0f}" if speed else "—",
                ]
            )
            + " |"
        )
    lines += [""]
    for entry in rows.values():
        row = entry["row"]
        own = {k: v for k, v in row.config.items() if k not in _SHOWN_ELSEWHERE}
        if row.budget_row or "epochs" in row.config or own:
            overrides = "".join(f"{k} {v}, " for k, v in own.items())
            budget = (
                f", stopped before an epoch that would pass the training time of the {row.budget_row} "
                "run with the same seed (or --budget-minutes)"
                if row.budget_row
                else ""
            )
            trained = ", ".join(text for text in map(_trained, entry["runs"]) if text)
            own_likelihood = (
                f" Its -ELBO is of the 8-bit images under the {own['likelihood']} likelihood (bits/dim "
                f"below), not comparable with the {protocol['likelihood']} rows'; its recon BCE and MSE "
                "are of its decoder's mean image, as for every row."
                if own.get("likelihood", protocol["likelihood"]) != protocol["likelihood"]
                else ""
            )
            held = row.config.get("schedule_epochs")
            stretch = (
                f"stretched to the first {held}, its final weights held after"
                if held
                else "stretched to them"
            )
            lines.append(
                f"{row.label}: {overrides}up to {row.epochs(protocol['epochs'])} epochs (the schedule "
                f"{stretch}){budget}; trained: {trained or 'none yet'}.{own_likelihood}"
            )
    bpd = [e for e in rows.values() if "neg_elbo_bits_per_dim" in e["metrics"]]
    lines += [""]
    if bpd:
        lines += [
            f"Bits/dim (-ELBO), {e['row'].label}: {_fmt(e['metrics']['neg_elbo_bits_per_dim'], 3)}"
            for e in bpd
        ]
    else:
        lines += [
            "Bits/dim: none — BCE on [0, 1] pixels is not a likelihood of 8-bit images "
            "(train with `--likelihood logistic` for bits/dim)."
        ]
    lines += ["", "Values are mean ± sd over seeds; ratios are of means. img/s: median over epochs.", ""]
    lines += ["## The claims (1-3: the study's; 4: its next step, for each deep row that ran)", ""]
    verdict = {True: "**holds**", False: "**does not hold**", None: "not decided"}
    lines += [f"{c.name}. {c.text}: {verdict[c.holds]} — {c.detail}" for c in claims]
    return "\n".join(lines) + "\n"


def to_csv(runs: list[Run]) -> str:
    keys = ["row", "seed", "status", *METRICS, "epochs", "train_seconds", "eval_seconds", "images_per_s"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for run in runs:
        writer.writerow({"row": run.row.name, "seed": run.seed, "status": run.status, **run_metrics(run)})
    return buf.getvalue()


def to_json(
    runs: list[Run], protocol: dict, commands: list[str], claims: list[Claim], machines: list[str]
) -> str:
    rows = aggregate(runs)
    record = {
        "commands": commands,
        "machine": "; ".join(machines),
        "machines": machines,
        "protocol": protocol,
        "rows": {
            name: {
                "label": e["row"].label,
                "config": dict(e["row"].config),
                "study": {"recon": e["row"].study_recon, "fid": e["row"].study_fid},
                "metrics": e["metrics"],
                "runs": [
                    {"seed": r.seed, "status": r.status, "error": r.error}
                    | ({"imported_from": r.source} if r.source else {})
                    | run_metrics(r)
                    | ({"history": r.history} if r.history else {})
                    for r in e["runs"]
                ],
            }
            for name, e in rows.items()
        },
        "claims": [c.__dict__ for c in claims],
    }
    return json.dumps(record, indent=2) + "\n"


def write_tables(
    out: Path,
    runs: list[Run],
    protocol: dict,
    commands: list[str],
    machines: list[str] | None = None,
    notes: list[str] = (),
) -> list[Claim]:
    """study.md, study.csv and study.json in ``out``; returns the claims' verdicts. ``machines``: those
    that trained the runs (protocol.json records them), else this one; ``notes``: lines for study.md."""
    claims = evaluate_claims(claim_values(runs))
    trained_on = machines or [machine()]
    write_text_atomic(
        markdown(runs, protocol, commands, claims, "; ".join(trained_on), list(notes)), out / "study.md"
    )
    write_text_atomic(to_csv(runs), out / "study.csv")
    write_text_atomic(to_json(runs, protocol, commands, claims, trained_on), out / "study.json")
    return claims
