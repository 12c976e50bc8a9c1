"""python -m fasthvae.study on a tiny budget: files, resume, failures, protocol; the claims' logic."""

import fcntl
import json
import re

import pytest
import torch

from fasthvae import train
from fasthvae.hardware import machine
from fasthvae.study import __main__ as study_cli
from fasthvae.study import plots
from fasthvae.study import rows as study_rows
from fasthvae.study.claims import evaluate_claims
from fasthvae.study.rows import ROWS, Row, register_row, register_variant, select_rows
from fasthvae.study.runner import Run, read_protocol, run_config
from fasthvae.training.checkpoint import load_checkpoint
from fasthvae.training.config import validate, with_model_defaults
from tests.helpers import requires, slow_rank_0_evaluation, torchrun

TINY_STUDY = [
    "--epochs",
    "2",
    "--limit-train",
    "64",
    "--limit-test",
    "32",
    "--batch-size",
    "32",
    "--fid-samples",
    "20",
    "--fid-extractor",
    "fasthvae-tiny",
    "--no-compile",
    "--loader",
    "resident",
]


def test_ddp_study_ranks_wait_for_rank_0_between_runs(data, tmp_path):
    """Two runs under DDP, rank 0 evaluating each for longer than the process group's timeout: the
    other rank waits before the next run's first collective, and both runs finish."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(slow_rank_0_evaluation("fasthvae.study.__main__"))
    args = ["--data", data, "--out", str(tmp_path / "study"), "--rows", "vae,hvae-beta", "--epochs", "1"]
    args += ["--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--fid-samples", "0"]
    proc = torchrun(str(script), *args, "--no-compile", "--loader", "resident", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("vae", "hvae-beta"):
        assert (tmp_path / "study" / row / "seed0" / "summary.json").is_file(), row
        assert not (tmp_path / "study" / row / "seed0" / "error.txt").exists(), row


def claims_of(vae, hvae_beta, hvae_ab):
    """Claims from (recon, fid) per row, one seed (or several: lists of pairs)."""
    rows = {"vae": vae, "hvae-beta": hvae_beta, "hvae-alpha-beta": hvae_ab}
    values = {
        name: {s: {"recon_bce": r, "fid": f} for s, (r, f) in enumerate(v if isinstance(v, list) else [v])}
        for name, v in rows.items()
    }
    return {c.name: c.holds for c in evaluate_claims(values)}


def test_claims_hold_on_the_studys_own_numbers():
    assert claims_of((30_291, 105.5), (33_069, 120.9), (27_717, 116.2)) == {"1": True, "2": True, "3": True}


def test_each_claim_can_fail():
    # the HVAE (alpha-beta) reconstructs worse than the VAE: claim 1 fails, the others hold
    assert claims_of((1000, 100), (1100, 120), (1010, 110)) == {"1": False, "2": True, "3": True}
    # beta-only HVAE better in recon (worse in FID): claim 2 fails
    assert claims_of((1000, 100), (990, 120), (950, 110))["2"] is False
    # an HVAE has the best FID: claim 3 fails
    assert claims_of((1000, 100), (1100, 120), (950, 90))["3"] is False


def test_claims_use_the_mean_over_seeds_and_report_the_spread():
    values = {
        "vae": {0: {"recon_bce": 100.0, "fid": 50.0}, 1: {"recon_bce": 100.0, "fid": 50.0}},
        "hvae-alpha-beta": {0: {"recon_bce": 90.0, "fid": 60.0}, 1: {"recon_bce": 104.0, "fid": 60.0}},
    }
    claim = evaluate_claims(values)[0]
    assert claim.holds is True and "-3.0%" in claim.detail and "seeds: -10.0%, +4.0%" in claim.detail
    small = {"vae": values["vae"], "hvae-alpha-beta": {s: {"recon_bce": 99.96, "fid": 60.0} for s in (0, 1)}}
    assert "-0.040% (seeds: -0.040%, -0.040%; sd 0.0%)" in evaluate_claims(small)[0].detail, (
        "a margin under 0.05% is not printed as -0.0%"
    )
    missing = evaluate_claims({"vae": values["vae"]})
    assert [c.holds for c in missing] == [None, None, None]
    assert missing[0].detail == "no finished run of hvae-alpha-beta in this report"
    assert missing[1].detail == "no finished run of hvae-beta in this report", "one reason said once"
    assert missing[2].detail == (
        "FID, HVAE (beta only) vs VAE: no finished run of hvae-beta in this report; "
        "FID, HVAE (alpha-beta) vs VAE: no finished run of hvae-alpha-beta in this report"
    )
    apart = evaluate_claims({"vae": values["vae"], "hvae-alpha-beta": {2: values["hvae-alpha-beta"][0]}})
    assert (
        apart[0].holds is None and "no seed on which both hvae-alpha-beta and vae finished" in apart[0].detail
    )
    half = evaluate_claims(values | {"hvae-beta": {0: {"recon_bce": 110.0}}})[1]
    assert half.holds is None, "one of two comparisons measured is not a verdict"
    assert half.detail == (
        "recon, HVAE (beta only) vs VAE: +10.0% (1 seed); "
        "FID, HVAE (beta only) vs VAE: not measured on a seed both rows finished"
    )


def test_the_deep_claim_compares_with_the_best_study_row_on_each_metric():
    study = {"vae": (1000, 100), "hvae-beta": (990, 120), "hvae-alpha-beta": (950, 110)}
    values = {name: {0: {"recon_bce": r, "fid": f}} for name, (r, f) in study.items()}
    assert [c.name for c in evaluate_claims(values)] == ["1", "2", "3"], "no deep row, no claim 4"

    def deep(recon, fid):
        return evaluate_claims(values | {"deep": {0: {"recon_bce": recon, "fid": fid}}})[3]

    beats = deep(940, 99)  # best recon: hvae-alpha-beta (950); best FID: vae (100)
    assert beats.holds is True
    assert (
        "recon, deep vs hvae-alpha-beta: -1.1%" in beats.detail and "FID, deep vs vae: -1.0%" in beats.detail
    )
    assert deep(960, 99).holds is False, "worse than the best row's reconstruction"
    assert deep(940, 101).holds is False, "worse than the best row's FID"
    both = evaluate_claims(
        values | {row: {0: {"recon_bce": 940, "fid": 101}} for row in ("deep", "deep-bce")}
    )
    assert [c.name for c in both[3:]] == ["4", "4 (deep-bce)"], "a claim for each deep row"
    assert "FID, deep-bce vs vae: +1.0%" in both[4].detail and both[4].holds is False
    alone = evaluate_claims({"deep": {0: {"recon_bce": 940, "fid": 101}}})[3]
    assert alone.holds is None and alone.detail == (
        "no finished run of a study row (vae, hvae-beta, hvae-alpha-beta) in this report"
    )


def test_rows_are_registered_by_name():
    assert [r.name for r in select_rows(["vae", "hvae-alpha-beta"])] == ["vae", "hvae-alpha-beta"]
    with pytest.raises(ValueError, match="unknown study row"):
        select_rows(["vae", "gan"])
    with pytest.raises(ValueError, match="exists already"):
        register_row(Row("vae", "again", {"model": "vae", "schedule": "beta"}))
    with pytest.raises(ValueError, match="must name a model"):
        Row("x", "x", {"model": "vae"})


def test_a_variant_row_is_its_parents_config_with_the_changes(monkeypatch):
    monkeypatch.setattr(study_rows, "ROWS", dict(ROWS))  # registered here only
    row = register_variant("deep-e12", "12 epochs", "deep-z16-b16-e11", {"epochs": 12})
    parent = ROWS["deep-z16-b16-e11"]
    assert dict(row.config) == dict(parent.config) | {"epochs": 12} and row.epochs(30) == 12
    assert row.budget_row == parent.budget_row == "vae" and parent.epochs(30) == 11
    assert study_rows.ROWS["deep-e12"] is row and "deep-e12" not in ROWS


def study(data, out, *extra) -> int:
    return study_cli.main(["--data", data, "--out", str(out), *TINY_STUDY, *extra])


@requires("torch_fidelity")  # the study and eval commands compute FID
def test_study_end_to_end_resumes_and_reports_failures(data, tmp_path, monkeypatch):
    out = tmp_path / "study"
    real_save = train.Trainer._save
    saves = {"n": 0}

    def die_mid_second_run(self):
        real_save(self)
        saves["n"] += 1
        if saves["n"] == 3:  # run 1 saved twice (2 epochs); run 2 dies after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "_save", die_mid_second_run)
    with pytest.raises(KeyboardInterrupt):
        study(data, out)
    vae, hvae_beta = out / "vae" / "seed0", out / "hvae-beta" / "seed0"
    assert (vae / "summary.json").is_file() and not (hvae_beta / "summary.json").is_file()
    assert load_checkpoint(hvae_beta / "checkpoint.pt")["epoch"] == 1
    assert "1/1 done" in (out / "study.md").read_text(), "finished rows are in the table as it goes"
    first_epoch = load_checkpoint(hvae_beta / "checkpoint.pt")["history"][0]
    vae_summary = (vae / "summary.json").read_bytes()
    monkeypatch.setattr(train.Trainer, "_save", real_save)

    real_run = train.Trainer.run

    def alpha_beta_fails(self, on_epoch=None):
        if self.config.schedule == "alpha-beta":
            raise RuntimeError("simulated failure")
        return real_run(self, on_epoch)

    monkeypatch.setattr(train.Trainer, "run", alpha_beta_fails)
    assert study(data, out) == 1, "a failed row makes the exit code non-zero"
    assert (vae / "summary.json").read_bytes() == vae_summary, "a finished row is skipped"
    resumed = load_checkpoint(hvae_beta / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["history"][0] == first_epoch, "continued, not restarted"
    assert "simulated failure" in (out / "hvae-alpha-beta" / "seed0" / "error.txt").read_text()
    table = (out / "study.md").read_text()
    assert "failed (RuntimeError: simulated failure)" in table
    for name in ("study.md", "study.csv", "study.json", "study.png", "samples.png", "protocol.json"):
        assert (out / name).is_file(), name

    monkeypatch.setattr(train.Trainer, "run", real_run)
    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or real_reset())
    assert study(data, out) == 0, "rerun: the failed row trains now"
    assert len(resets) == 1, "each run starts with a fresh compile cache (dynamo's recompile limit)"
    record = json.loads((out / "study.json").read_text())
    assert {n: r["runs"][0]["status"] for n, r in record["rows"].items()} == dict.fromkeys(
        ["vae", "hvae-beta", "hvae-alpha-beta"], "done"
    )
    assert all(isinstance(c["holds"], bool) for c in record["claims"])
    vae_row = record["rows"]["vae"]["metrics"]
    assert vae_row["recon_bce"]["values"][0] > 0 and vae_row["fid"]["values"][0] >= 0
    assert "| VAE | 1/1 done |" in (out / "study.md").read_text()
    assert (out / "study.csv").read_text().count("\n") == 4

    table = undated(out / "study.md")
    (out / "study.md").unlink()
    (out / "samples.png").unlink()
    trained_on = json.loads((out / "protocol.json").read_text())["machines"]
    assert trained_on == [machine()] and f"Machine: {machine()}" in "\n".join(table)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the report names the machine that trained, not its own
    try:
        assert study_cli.main(["--out", str(out), "--report-only"]) == 0, "tables from the folder alone"
    finally:
        torch.set_num_threads(threads)
    assert (out / "samples.png").is_file() and undated(out / "study.md") == table


def test_bits_per_dim_picture_only_for_runs_that_measured_it_each_epoch(tmp_path):
    epochs = [
        {"epoch": 1.0, "seconds": 300.0, "test_bits_per_dim": 5.1},
        {"epoch": 2.0, "seconds": 290.0, "test_bits_per_dim": 4.9},
    ]
    without = Run(ROWS["vae"], 0, tmp_path, history=[{"epoch": 1.0, "seconds": 60.0}])
    assert not plots.save_bits_per_dim([without], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert plots.save_bits_per_dim(
        [without, Run(ROWS["deep"], 0, tmp_path, history=epochs)], tmp_path / "b.png", 4.0
    )
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Both axes of the picture: minutes summed over the epochs before, and the epochs themselves.
    deep = Run(ROWS["deep"], 0, tmp_path, history=[*epochs, {"epoch": 3.0, "seconds": 280.0}])
    assert plots.bits_per_dim_curve(deep) == [(5.0, 1.0, 5.1), (9.833333333333334, 2.0, 4.9)]
    # The key: a colour per row, a line style per seed, the target dashed; none of them per run.
    runs = [Run(ROWS[row], seed, tmp_path, history=epochs) for row in ("deep", "deep-bce") for seed in (1, 0)]
    assert plots.bits_per_dim_legend(runs, 4.0) == [
        (ROWS["deep"].label, "C0", "-"),
        (ROWS["deep-bce"].label, "C1", "-"),
        ("seed 0", "black", "-"),
        ("seed 1", "black", ":"),
        ("target 4.0", "grey", "--"),
    ]
    assert plots.save_bits_per_dim(runs, tmp_path / "four.png", 4.0)


def undated(path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("Written:")]


def test_a_second_study_on_the_same_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        held.write("12345")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert study(data, out, "--rows", "vae") == 2
    assert "another fasthvae.study (pid 12345) is running" in capsys.readouterr().err
    assert study_cli.main(["--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "holds no study" in capsys.readouterr().err


def test_study_refuses_another_protocol_and_unknown_rows(data, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "protocol.json").write_text(
        json.dumps({"protocol": {"epochs": 5}, "rows": ["vae"], "seeds": [0], "command": "x"})
    )
    assert study(data, out, "--rows", "vae") == 2
    assert "another protocol (epochs: 5 there, 2 asked" in capsys.readouterr().err
    assert study(data, tmp_path / "other", "--rows", "vae,gan") == 2
    assert "unknown study row(s) gan" in capsys.readouterr().err
    assert set(ROWS) >= {"vae", "hvae-beta", "hvae-alpha-beta"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_registered_row_is_a_trainer_config_that_validates(name, tmp_path):
    row = ROWS[name]
    budget = 1.0 if row.budget_row else None
    config = with_model_defaults(run_config(tmp_path, row, 3, {"epochs": 30}, budget))
    validate(config)
    assert {k: getattr(config, k) for k in row.config} == row.config and config.seed == 3


def test_the_folder_keeps_the_seeds_asked_of_each_row_and_every_command(data, tmp_path, monkeypatch):
    tiny = {"model": "vae", "schedule": "beta"}
    for name in ("tiny-a", "tiny-b"):  # rows that fail at once (their budget row never ran): nothing trains
        monkeypatch.setitem(ROWS, name, Row(name, name, tiny, budget_row="vae"))
    out = tmp_path / "study"
    assert study(data, out, "--rows", "tiny-a") == 1
    assert study(data, out, "--rows", "tiny-b", "--seeds", "1") == 1
    assert study(data, out, "--rows", "tiny-b", "--seeds", "1") == 1, "a rerun adds no command"
    record = json.loads((out / "protocol.json").read_text())
    assert record["runs"] == {"tiny-a": [0], "tiny-b": [1]}
    assert len(record["commands"]) == 2 and record["commands"][1].endswith("--rows tiny-b --seeds 1")
    table = (out / "study.md").read_text()
    assert [line for line in table.splitlines() if line.startswith("Command: ")] == [
        f"Command: `{command}`  " for command in record["commands"]
    ]
    assert "pending" not in table, "a seed not asked of a row is not a run of it"
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert {n: [r["seed"] for r in row["runs"]] for n, row in rows.items()} == {"tiny-a": [0], "tiny-b": [1]}


def test_a_folder_from_before_per_row_seeds_asked_every_seed_of_every_row(tmp_path):
    old = {"protocol": {"epochs": 2}, "rows": ["vae", "hvae-beta"], "seeds": [0, 1], "command": "x"}
    (tmp_path / "protocol.json").write_text(json.dumps(old))
    record = read_protocol(tmp_path)
    assert record["runs"] == {"vae": [0, 1], "hvae-beta": [0, 1]} and record["commands"] == ["x"]


@requires("torch_fidelity")  # the study and eval commands compute FID
def test_a_row_with_a_time_budget_trains_for_its_budget_rows_time(data, tmp_path, monkeypatch):
    tiny_deep = {"model": "deep", "schedule": "staggered", "layout": "1x1,32x1", "width": 8, "zdim": 2}
    tiny_deep |= {"likelihood": "mixture"}  # its own likelihood, like the real deep row
    monkeypatch.setitem(
        ROWS,
        "deep-tiny",
        Row("deep-tiny", "tiny deep", tiny_deep | {"epochs": 6, "schedule_epochs": 4}, budget_row="vae"),
    )
    out = tmp_path / "study"
    assert study(data, out, "--rows", "deep-tiny") == 1, "without the budget row's run it cannot start"
    assert "has not finished" in (out / "deep-tiny" / "seed0" / "error.txt").read_text()
    real_epoch = train.Trainer._run_epoch

    def slow_deep_epochs(self, *args):  # each deep epoch "takes" 40% of the VAE's training time
        row = real_epoch(self, *args)
        if self.config.model == "deep":
            row["seconds"] = 0.4 * 60 * self.config.time_limit
        return row

    monkeypatch.setattr(train.Trainer, "_run_epoch", slow_deep_epochs)
    assert study(data, out, "--rows", "vae,deep-tiny") == 0
    lines = (out / "vae" / "seed0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    deep = out / "deep-tiny" / "seed0"
    config = json.loads((deep / "config.json").read_text())
    seconds = sorted(float(r.split(",")[header.index("seconds")]) for r in lines[1:])
    assert config["time_limit"] == pytest.approx(2 * (seconds[0] + seconds[1]) / 2 / 60)  # 2 x median
    summary = json.loads((deep / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["stopped_by_time_limit"], "a third epoch would pass 100%"
    assert config["schedule_epochs"] == 4
    assert (
        "up to 6 epochs (the schedule stretched to the first 4, its final weights held after)"
        in (out / "study.md").read_text()
    )
    assert "Its -ELBO is of the 8-bit images under the mixture likelihood" in (out / "study.md").read_text()
    assert "Bits/dim (-ELBO), tiny deep:" in (out / "study.md").read_text()
    assert "seed 0: 2 epochs in" in (out / "study.md").read_text()

    pooled = tmp_path / "pooled"  # the vae row imported from the first study's table
    imports = ("--import-table", str(out / "study.json"))
    assert study(data, pooled, "--rows", "deep-tiny", "--budget-minutes", "0.25", *imports) == 0
    table = json.loads((pooled / "study.json").read_text())
    assert list(table["rows"]) == ["vae", "deep-tiny"]
    first = json.loads((out / "study.json").read_text())
    assert len(first["commands"]) == 2, "the failed first command and the one that ran the vae row"
    assert table["rows"]["vae"]["runs"][0] == first["rows"]["vae"]["runs"][0] | {
        "imported_from": " && ".join(first["commands"])
    }
    assert f"| vae | 0 | `{out}/study.json` |" in (pooled / "study.md").read_text()
    bare = tmp_path / "bare"  # the pooled study without its run folders: every run imported
    bare.mkdir()
    (bare / "protocol.json").write_text((pooled / "protocol.json").read_text())
    assert study(data, bare, "--report-only", "--import-table", str(pooled / "study.json")) == 0
    described = (bare / "study.md").read_text()
    assert re.search(r"trained: seed 0: 2 epochs in \d+\.\d min \(imported\)\.", described), described
    vae_history = first["rows"]["vae"]["runs"][0]["history"]  # its metrics.csv, kept for curves
    assert [e["epoch"] for e in vae_history] == [1.0, 2.0] and "recon" in vae_history[0]
    again = json.loads((bare / "study.json").read_text())["rows"]["vae"]["runs"][0]
    assert again["history"] == vae_history and "history" not in table["rows"]["vae"]["metrics"]
    changed = first | {"rows": first["rows"] | {"vae": first["rows"]["vae"] | {"config": {"model": "vae"}}}}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    report = ("--report-only", "--import-table", str(tmp_path / "changed.json"))
    assert study(data, pooled, *report) == 0
    assert "Not imported (its row has changed since): vae" in (pooled / "study.md").read_text()
    older = {k: v for k, v in first.items() if k not in ("commands", "machines")} | {
        "command": "python -m fasthvae.study x",
        "machine": f"{machine()}; {machine()}; CPU B (AVX2, 1 threads), no GPU; torch 2.11.0",
    }
    (tmp_path / "older.json").write_text(json.dumps(older))  # a table from before "commands" and "machines"
    assert study(data, pooled, "--report-only", "--import-table", str(tmp_path / "older.json")) == 0
    assert "| vae | 0 | `runs/study/study.json` |" in (pooled / "study.md").read_text()
    machines = [machine(), "CPU B (AVX2, 1 threads), no GPU; torch 2.11.0"]
    assert json.loads((pooled / "study.json").read_text())["machines"] == machines, "each machine once"
    assert f"Machine: {'; '.join(machines)}  " in (pooled / "study.md").read_text()
    (tmp_path / "other.json").write_text(json.dumps(first | {"protocol": first["protocol"] | {"lr": 1.0}}))
    assert study(data, pooled, "--report-only", "--import-table", str(tmp_path / "other.json")) == 2

    elsewhere = tmp_path / "budget-given"  # the budget row ran in another study: its time is given
    assert study(data, elsewhere, "--rows", "deep-tiny", "--budget-minutes", "0.25") == 0
    config = json.loads((elsewhere / "deep-tiny" / "seed0" / "config.json").read_text())
    assert config["time_limit"] == 0.25
    summary = json.loads((elsewhere / "deep-tiny" / "seed0" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["stopped_by_time_limit"]
    assert "seed 0: 2 epochs in 0.2 min" in (elsewhere / "study.md").read_text()


@requires("torch_fidelity")  # the study and eval commands compute FID
def test_sigterm_stops_the_whole_study_and_a_rerun_goes_on(data, tmp_path, monkeypatch, capsys):
    """A signal in the second row saves that run mid-epoch and stops the study (exit 75, no row
    marked failed); the same command then finishes it."""
    import os
    import signal

    from fasthvae.training.loop import Stepper

    real = Stepper.__call__
    calls = {"n": 0}

    def sigterm_in_the_second_row(self, *args):
        result = real(self, *args)
        calls["n"] += 1
        if calls["n"] == 5:  # 2 steps per epoch, 2 epochs per row: the second row's first step
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Stepper, "__call__", sigterm_in_the_second_row)
    out = tmp_path / "study"
    assert study(data, out, "--rows", "vae,hvae-beta") == 75
    assert "stopped by SIGTERM" in capsys.readouterr().err
    second = out / "hvae-beta" / "seed0"
    assert not (second / "error.txt").exists()
    assert load_checkpoint(second / "checkpoint.pt")["progress"]["batch"] == 1
    monkeypatch.setattr(Stepper, "__call__", real)
    assert study(data, out, "--rows", "vae,hvae-beta") == 0
    assert load_checkpoint(second / "checkpoint.pt")["step"] == 4


def test_a_run_resumed_under_a_newer_trainer_keeps_its_metrics_readable(tmp_path):
    """Epochs trained before a column existed (e.g. active units) leave it blank in metrics.csv, and
    the study reads those runs (this once failed a study mid-way)."""
    from fasthvae.study.runner import read_run, run_folder
    from fasthvae.training.artifacts import write_metrics

    folder = run_folder(tmp_path, "vae", 0)
    folder.mkdir(parents=True)
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5, "active_z": 12}]
    write_metrics(history, folder / "metrics.csv")
    assert (folder / "metrics.csv").read_text().splitlines() == ["epoch,loss,active_z", "1,2.0,", "2,1.5,12"]
    run = read_run(tmp_path, select_rows(["vae"])[0], 0)
    assert run.history == [{"epoch": 1.0, "loss": 2.0}, {"epoch": 2.0, "loss": 1.5, "active_z": 12.0}]
