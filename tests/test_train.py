"""The trainer: smoke runs, learning, resume, checkpoints, robustness, AMP and DDP (CPU)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fasthvae import train
from fasthvae.data.dali import dali_available
from fasthvae.hardware import cpu_flags
from fasthvae.models import build_model
from fasthvae.ops import backend
from fasthvae.ops.compiled_cpu import CpuTwins
from fasthvae.training.checkpoint import CheckpointError, load_checkpoint, save_atomic
from fasthvae.training.distributed import DistInfo
from fasthvae.training.loop import Stepper, compile_options
from fasthvae.training.runtime import default_compile_wrapper, resolve_runtime
from tests.helpers import (
    DEEP_TINY,
    KILL_AFTER_FIRST_CHECKPOINT,
    PARAMETERS_OF_EACH_RANK,
    PROBE_ON_RANK_0,
    SMALL,
    assert_same_state,
    compile_with_backend,
    make_compilation_fail,
    read_metrics,
    run_process,
    scale_loss_by_step,
    slow_rank_0_evaluation,
    torchrun,
)


def run(data: str, out: Path, *extra: str) -> dict:
    argv = ["--data", data, "--out", str(out), "--epochs", "2", *SMALL, *extra]
    assert train.main(argv) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("model", ["vae", "hvae"])
@pytest.mark.parametrize("compiled", [False, True])
def test_smoke_run_leaves_every_output(data, tmp_path, model, compiled):
    flag = "--compile" if compiled else "--no-compile"
    summary = run(data, tmp_path, "--model", model, "--limit-train", "96", flag)
    for name in (
        "config.json",
        "metrics.csv",
        "checkpoint.pt",
        "samples.png",
        "reconstructions.png",
        "loss_curves.png",
        "summary.json",
    ):
        assert (tmp_path / name).is_file(), name
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    kls = {"vae": {"kl_z"}, "hvae": {"kl_z1", "kl_z2"}}[model]
    assert kls <= set(rows[0]) and {"loss", "recon", "alpha", "beta", "images_per_s", "seconds"} <= set(
        rows[0]
    )
    test = summary["test"]
    assert test["images"] == 64 and all(np.isfinite(test[k]) for k in ("recon_bce", "recon_mse", *kls))
    assert summary["runtime"]["compile"] is compiled


def test_loss_decreases_on_a_fixed_batch(data):
    torch.manual_seed(0)
    model = build_model("hvae", channels=8, latent=16, z1_channels=4)
    with np.load(data) as f:
        x = torch.from_numpy(f["x_train"][:32]).permute(0, 3, 1, 2).float() / 255
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(x, [1.0, 1.0])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses  # BCE falls ~16% in 30 steps; no learning: ~0%


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    common = ["--data", data, "--epochs", "2", *SMALL, "--limit-train", "96", "--no-compile", "--seed", "3"]
    common += ["--loader", "torch"]  # worker processes with their own RNGs: the harder case
    common += ["--lr-schedule", "cosine"]  # the learning rate too resumes where it was
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_process(*common, "--out", str(straight)).returncode == 0
    killed = run_process(*common, "--out", str(split), code=KILL_AFTER_FIRST_CHECKPOINT)
    assert "KeyboardInterrupt" in killed.stderr
    assert load_checkpoint(split / "checkpoint.pt")["epoch"] == 1
    resumed = run_process(*common, "--out", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    timing = {"seconds": 0, "images_per_s": 0}
    assert [r | timing for r in a["history"]] == [r | timing for r in b["history"]]
    assert_same_state(a, b)


def test_refuses_to_overwrite_and_checks_resume(data, tmp_path, capsys):
    run(data, tmp_path, "--limit-train", "64", "--epochs", "1")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    argv = ["--data", data, "--out", str(tmp_path), *SMALL, "--epochs", "1"]
    assert train.main(argv) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert train.main([*argv, "--resume", "--lr", "0.5"]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before, "a refused run must not touch the checkpoint"


def test_corrupt_checkpoint_and_bad_arguments(data, tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert train.main(["--data", data, "--out", str(tmp_path), *SMALL, "--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert train.main(["--data", data, "--out", str(tmp_path / "x"), *SMALL, "--epochs", "0"]) == 2
    assert "--epochs must be positive" in capsys.readouterr().err
    assert train.main(["--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "y"), *SMALL]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "gan"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"v": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["v"] == 1, "a failed write must leave the old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "no temp file left behind"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_non_finite_steps_are_skipped_then_stop(data, tmp_path, monkeypatch, capsys):
    # isolated bad steps, then nothing but NaN
    scale_loss_by_step(monkeypatch, lambda n: float("nan") if n in (2, 9) or n > 10 else 1.0)
    argv = [
        "--data",
        data,
        "--out",
        str(tmp_path),
        *SMALL,
        "--epochs",
        "2",
        "--limit-train",
        "256",
        "--max-skips",
        "3",
        "--no-compile",
    ]  # 8 steps per epoch
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "3 consecutive skipped steps" in err
    assert "Likely cause: the loss went non-finite while each of its terms was finite" in err
    assert "epoch 1: 1 skipped step(s) (1 loss; see skips.jsonl)" in err
    skips = [json.loads(line) for line in (tmp_path / "skips.jsonl").read_text().splitlines()]
    assert [s["step"] for s in skips] == [2, 9, 11, 12, 13]
    assert all(s["term"] == "loss" and s["reason"] == "non-finite" and s["parameter"] for s in skips)
    assert skips[0]["epoch"] == 1 and len(skips[0]["weights"]) == 2
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and state["history"][0]["skipped_steps"] == 1, "epoch 1 skipped one step"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_amp_runs_on_cpu(data, tmp_path):
    summary = run(data, tmp_path, "--limit-train", "64", "--epochs", "1", "--amp", "--no-compile")
    native = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags() or "bf16" in cpu_flags()
    assert summary["runtime"]["amp_dtype"] == ("torch.bfloat16" if native else "None")
    assert (summary["runtime"]["amp_fallback"] is None) == native
    assert json.loads((tmp_path / "config.json").read_text())["runtime"] == summary["runtime"]
    assert np.isfinite(summary["test"]["neg_elbo"])


def test_resume_keeps_the_runs_epochs_unless_extended(data, tmp_path, capsys):
    base = ["--data", data, "--out", str(tmp_path), *SMALL, "--limit-train", "64", "--no-compile"]
    assert train.main([*base, "--epochs", "1"]) == 0
    assert train.main([*base, "--resume"]) == 0  # a finished run stays finished
    assert len(read_metrics(tmp_path)) == 1
    assert train.main([*base, "--resume", "--epochs", "3"]) == 0  # extended explicitly
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 3 and state["config"]["schedule_epochs"] == 1
    assert "schedule keeps its 1-epoch length" in capsys.readouterr().out
    rows = read_metrics(tmp_path)  # the added epochs hold the schedule's final weights
    assert {(r["alpha"], r["beta"]) for r in rows[1:]} == {("0.25", "0.4")}
    assert train.main([*base, "--resume", "--epochs", "2"]) == 2
    assert "below the 3 epochs" in capsys.readouterr().err


def test_a_run_stopped_in_its_evaluation_is_evaluated_again_on_resume(data, tmp_path, monkeypatch):
    base = ["--data", data, "--epochs", "1", *SMALL, "--limit-train", "64", "--no-compile", "--seed", "5"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main([*base, "--out", str(straight)]) == 0
    real_evaluate = train.evaluate_model

    def stop_in_evaluation(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_model", stop_in_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train.main([*base, "--out", str(stopped)])
    assert not (stopped / "summary.json").exists()
    assert load_checkpoint(stopped / "checkpoint.pt")["epoch"] == 1, "trained and saved before it stopped"
    monkeypatch.setattr(train, "evaluate_model", real_evaluate)
    assert train.main([*base, "--out", str(stopped), "--resume"]) == 0
    assert len(read_metrics(stopped)) == 1, "evaluated again, not trained again"
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, stopped))
    assert a["test"] == b["test"], "the same weights and random state: the same test metrics"
    assert b["train_seconds"] == load_checkpoint(stopped / "checkpoint.pt")["history"][0]["seconds"]
    assert (a["epochs"], a["steps"]) == (b["epochs"], b["steps"])


def test_cosine_learning_rate_per_step_and_its_end(data, tmp_path, capsys):
    base = ["--data", data, "--out", str(tmp_path), *SMALL, "--limit-train", "64", "--no-compile"]
    assert train.main([*base, "--epochs", "2", "--lr", "0.002", "--lr-schedule", "cosine"]) == 0
    rows = read_metrics(tmp_path)  # 2 steps an epoch; each epoch's row has its last step's rate
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [0.002 * (1 + math.cos(math.pi * t / 2)) / 2 for t in (0.5, 1.5)]
    )
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(float(rows[-1]["lr"]))
    assert train.main([*base, "--resume", "--epochs", "3"]) == 2  # epoch 3 would train at lr 0
    assert "goes past the cosine learning rate's end (epoch 2)" in capsys.readouterr().err
    assert train.main([*base, "--overwrite", "--epochs", "1"]) == 0  # constant: the rate stays
    assert [float(r["lr"]) for r in read_metrics(tmp_path)] == [0.001]


def test_free_bits_reach_the_steps_loss_and_must_not_be_negative(data, tmp_path, capsys):
    """Far above every KL, each term of the trained loss is its floor: loss - recon is the floor
    times the model's latent dimensions (z1 4 x 8 x 8, z2 16 in SMALL), at weight 1."""
    base = ["--data", data, "--out", str(tmp_path), *SMALL, "--limit-train", "64", "--no-compile"]
    assert train.main([*base, "--epochs", "1", "--schedule", "constant", "--free-bits", "100"]) == 0
    row = read_metrics(tmp_path)[0]
    assert float(row["loss"]) - float(row["recon"]) == pytest.approx(100 * (4 * 8 * 8 + 16), rel=1e-5)
    assert json.loads((tmp_path / "config.json").read_text())["free_bits"] == 100
    assert train.main([*base, "--overwrite", "--free-bits", "-1"]) == 2
    assert "--free-bits must be >= 0, got -1.0" in capsys.readouterr().err


def test_kl_warm_up_reaches_the_steps_weights(data, tmp_path):
    base = ["--data", data, "--out", str(tmp_path), *SMALL, "--limit-train", "64", "--no-compile"]
    assert train.main([*base, "--epochs", "2", "--schedule", "constant", "--kl-warmup", "4"]) == 0
    rows = read_metrics(tmp_path)  # each epoch's row has the weights at its end
    assert [(float(r["alpha"]), float(r["beta"])) for r in rows] == [(0.25, 0.25), (0.5, 0.5)]
    # Epoch 1's two steps weigh the KLs by 0 and 0.125 (epochs 0 and 0.5 of a 4-epoch ramp): the
    # loss carries at most 0.125 of the epoch's mean KL (all of it without the warm-up).
    first = rows[0]
    kl = sum(float(v) for k, v in first.items() if k.startswith("kl"))
    assert kl > 0 and 0 <= float(first["loss"]) - float(first["recon"]) <= 0.125 * kl * (1 + 1e-6)


def test_kl_balancing_acts_while_the_kl_warm_up_ramps_and_needs_one(data, tmp_path, monkeypatch, capsys):
    """Each step of the warm-up's epoch gets balance 1, each step after it 0; the option is kept
    in config.json, and without --kl-warmup it is an error naming both options."""
    seen: list[tuple[int, float | None]] = []
    real = Stepper.__call__

    def recording(self, x, weights, balance=None):
        seen.append((len(seen), None if balance is None else balance.item()))
        return real(self, x, weights, balance)

    monkeypatch.setattr(Stepper, "__call__", recording)
    base = ["--data", data, "--out", str(tmp_path), *SMALL, "--limit-train", "64", "--no-compile"]
    args = ["--epochs", "2", "--schedule", "constant", "--batch-size", "32", "--kl-warmup", "1"]
    assert train.main([*base, *args, "--kl-balance"]) == 0
    assert [b for _, b in seen] == [1.0, 1.0, 0.0, 0.0]
    assert json.loads((tmp_path / "config.json").read_text())["kl_balance"] is True
    seen.clear()
    assert train.main([*base, *args, "--overwrite"]) == 0
    assert [b for _, b in seen] == [None] * 4, "off by default"
    assert train.main([*base, "--overwrite", "--kl-balance"]) == 2
    assert "--kl-balance acts while the KL warm-up ramps: give --kl-warmup" in capsys.readouterr().err


def test_discretized_likelihood_reports_bits_per_dim(data, tmp_path):
    summary = run(
        data,
        tmp_path,
        "--limit-train",
        "64",
        "--epochs",
        "1",
        "--likelihood",
        "logistic",
        "--iw-samples",
        "3",
    )
    test = summary["test"]
    assert 0 < test["neg_elbo_bits_per_dim"] < 16
    assert test["neg_elbo_bits_per_dim"] == pytest.approx(test["neg_elbo"] / (3072 * np.log(2)))
    assert "neg_iw_bound_k3_bits_per_dim" in test


def test_ddp_ranks_wait_for_a_rank_0_evaluation_longer_than_the_group_timeout(data, tmp_path):
    """Rank 0 evaluates alone for longer than the process group's timeout (NCCL's is 10 minutes;
    8 s here): the other rank waits for it without timing out, and both exit 0 with the summary."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(slow_rank_0_evaluation("fasthvae.train"))
    args = ["--data", data, "--out", str(tmp_path / "run"), "--epochs", "1", *SMALL, "--limit-train", "64"]
    proc = torchrun(str(script), *args, "--no-compile", "--fid-samples", "0", "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_ddp_two_gloo_processes(data, tmp_path, monkeypatch):
    """A DDP run (whose speed probe runs on rank 0 and is taken by both ranks)."""
    monkeypatch.setenv("FASTHVAE_CACHE_DIR", str(tmp_path / "cache"))
    script = tmp_path / "probe_on_rank_0.py"
    script.write_text(PROBE_ON_RANK_0)
    out = tmp_path / "ddp"
    args = [
        "--data",
        data,
        "--out",
        str(out),
        "--epochs",
        "1",
        *SMALL,
        "--limit-train",
        "128",
        "--no-compile",
    ]
    proc = torchrun(str(script), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: False True" in proc.stdout and "rank 1: False True" in proc.stdout
    rows = read_metrics(out)
    assert len(rows) == 1
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2, "128 images, 2 ranks, batch 32: 2 steps per rank"
    assert len(state["rng"]) == 2


def test_ddp_trains_the_compiled_step_with_the_cpu_default_wrapper(data, tmp_path):
    """Two gloo ranks train the compiled step as a CPU run does by default (Inductor's C++ wrapper):
    the step compiles (``--compile``: a failure would be an error) and both ranks end with the same
    parameters, which they would not if the compiled step did not all-reduce the gradients of
    their different shards."""
    script = tmp_path / "parameters_of_each_rank.py"
    script.write_text(PARAMETERS_OF_EACH_RANK)
    out = tmp_path / "ddp"
    args = ["--data", data, "--out", str(out), "--epochs", "1", *SMALL, "--limit-train", "128"]
    proc = torchrun(str(script), *args, "--compile", "--speed", "fixed", "--no-tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert [rank for rank, _ in reports] == ["rank 0", "rank 1"], proc.stdout[-2000:]
    (wrapper_0, failure_0, total_0), (wrapper_1, failure_1, total_1) = (r.split() for _, r in reports)
    assert (wrapper_0, failure_0) == (wrapper_1, failure_1) == ("cpp", "None")
    assert total_0 == total_1
    config = json.loads((out / "config.json").read_text())
    assert config["runtime"]["compile"] and config["runtime"]["compile_wrapper"] == "cpp"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2, "128 images, 2 ranks, batch 32"


def read_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_events_are_written_and_readable(data, tmp_path):
    base = ["--data", data, "--out", str(tmp_path), *SMALL, "--limit-train", "128", "--no-compile"]
    assert train.main([*base, "--epochs", "1", "--tensorboard"]) == 0  # 4 steps per epoch
    assert train.main([*base, "--epochs", "2", "--resume"]) == 0  # on by default when installed
    events = read_events(tmp_path)
    tags = events.Tags()
    for tag in ("loss", "recon", "kl_z1", "kl_z2", "grad_norm", "skipped_steps", "images_per_s"):
        assert f"train/{tag}" in tags["scalars"], tag
    assert {"weights/alpha", "weights/beta"} <= set(tags["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9)), "one value per step, across the resume"
    assert all(np.isfinite(e.value) for e in loss)
    assert {"samples", "reconstructions"} <= set(tags["images"])
    assert [e.step for e in events.Images("samples")] == [4, 8], "one grid per epoch"
    assert json.loads((tmp_path / "config.json").read_text())["runtime"]["tensorboard"] is True


def test_no_tensorboard_writes_no_events(data, tmp_path):
    run(data, tmp_path, "--limit-train", "64", "--epochs", "1", "--no-tensorboard", "--no-compile")
    assert not list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 is not installed")
def test_an_image_folder_trains_through_dali_decoding_on_the_fly(tmp_path, monkeypatch):
    """--data FOLDER --loader dali: the training images stay on disk (JPEGs and PNGs of two sizes,
    decoded and resized by DALI as it reads them; CPU operators here, nvJPEG on a GPU)."""
    from PIL import Image

    from fasthvae.data import sources

    folder, rng = tmp_path / "images", np.random.default_rng(3)
    for i in range(80):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        side = 32 if i % 2 else 48
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        image.save(sub / (f"{i:03d}.jpg" if i % 4 < 2 else f"{i:03d}.png"))
    decoded = []
    real_decode = sources._decode
    monkeypatch.setattr(
        sources, "_decode", lambda files, size: decoded.append(len(files)) or real_decode(files, size)
    )
    out = tmp_path / "run"
    argv = ["--data", str(folder), "--out", str(out), "--loader", "dali", *SMALL[:-2], "--epochs", "1"]
    assert train.main([*argv, "--batch-size", "16", "--no-compile", "--no-tensorboard"]) == 0
    assert decoded == [8], "only the 8 test images are decoded up front"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 72 and summary["runtime"]["loader"] == "dali"
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 5 and np.isfinite(state["history"][0]["loss"]), "72 images, batch 16: 5 steps"


def test_every_config_field_has_a_resume_rule_and_an_option():
    """The parser is generated from TrainConfig, and each field says what a resume does with it: a
    new field cannot be forgotten in either."""
    from dataclasses import fields

    from fasthvae.training.config import RESUME_RULES, TrainConfig, build_parser

    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    for f in fields(TrainConfig):
        assert f.metadata.get("on_resume") in RESUME_RULES, f"{f.name}: no resume rule (use option())"
        assert f.metadata["help"], f.name
        assert (f.name in flags) == f.metadata["cli"], f.name
    assert train.parse_args([]) == TrainConfig(), "the parser's defaults are the dataclass's"


def test_an_odd_last_batch_leaves_the_compiled_step_static(data, tmp_path, monkeypatch):
    """The epoch's last partial batch gets its own static graph; no graph of the step is ever
    compiled with a symbolic batch size (which the full batches after it would run)."""
    symbolic = []

    def record(gm, example_inputs):
        values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
        sizes = [d for v in values if isinstance(v, torch.Tensor) for d in v.shape]
        symbolic.append(any(isinstance(v, torch.SymInt) for v in values + sizes))
        return gm.forward

    compile_with_backend(monkeypatch, record)
    run(data, tmp_path, "--limit-train", "80", "--compile", "--no-tensorboard", "--fid-samples", "0")
    torch._dynamo.reset()
    assert len(symbolic) >= 2 and not any(symbolic), symbolic  # 80 = 2 x 32 + 16: two shapes, both static


def test_a_default_compilation_that_fails_trains_eager_and_says_so(data, tmp_path, monkeypatch, capsys):
    """Compilation on by default (not asked for) that fails on the first step: the run trains
    without it, prints why, and config.json and summary.json say so; asked for, it is an error."""
    make_compilation_fail(monkeypatch)
    summary = run(data, tmp_path / "auto", "--limit-train", "64", "--speed", "fixed", "--no-tensorboard")
    assert "the step failed to compile (BackendCompilerFailed" in capsys.readouterr().err
    config = json.loads((tmp_path / "auto" / "config.json").read_text())["runtime"]
    for runtime in (summary["runtime"], config):
        assert runtime["compile"] is False and "the compiler broke" in runtime["compile_failed"]
    assert len(read_metrics(tmp_path / "auto")) == 2
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="the compiler broke"):
        train.main(
            ["--data", data, "--out", str(tmp_path / "asked"), *SMALL, "--limit-train", "64", "--compile"]
        )
    torch._dynamo.reset()


def test_epochs_drop_their_last_partial_batch_with_ddp_and_on_cuda():
    """Static shapes where they matter: DDP ranks take equal steps; on CUDA an odd last batch would
    recompile the step and re-benchmark cuDNN each epoch. On one CPU process every image trains."""
    assert not train.drops_last_batch(DistInfo(), torch.device("cpu"))
    assert train.drops_last_batch(DistInfo(), torch.device("cuda"))
    assert train.drops_last_batch(DistInfo(rank=1, world_size=2), torch.device("cpu"))


def without_twins(options: dict) -> dict:
    """A CPU step's compile options less the pass that calls the fused ops' C++ twins, checked to be
    there where the extension is loaded (``tests/test_compiled_cpu.py`` shows what it does)."""
    options = dict(options)
    twins = options.pop("post_grad_custom_post_pass", None)
    assert isinstance(twins, CpuTwins) or backend.extension() is None
    return options


def test_the_compiled_step_draws_its_noise_with_aten_on_cuda():
    """On CUDA the step compiles with ``fallback_random`` besides its mode's options: Triton 3.6
    rejected the kernel Inductor made of the unfused deep model's noise and likelihood for sm_90.
    On a CPU the options are the mode's and the pass that calls the fused ops' C++ twins."""
    assert without_twins(compile_options("default", torch.device("cpu"))) == {}
    cpu = without_twins(compile_options("reduce-overhead", torch.device("cpu")))
    assert cpu == {"triton.cudagraphs": True}
    cuda = compile_options("reduce-overhead", torch.device("cuda", 0))
    assert cuda == {"triton.cudagraphs": True, "fallback_random": True}


def test_the_cpp_wrapper_is_the_default_on_cpu_only():
    """On CPU the step compiles with Inductor's C++ wrapper unless told otherwise; on CUDA, where it
    has not run, with the python wrapper."""
    assert default_compile_wrapper(torch.device("cpu")) == "cpp"
    assert default_compile_wrapper(torch.device("cuda", 0)) == "python"
    for given, expected in ((None, "cpp"), ("python", "python"), ("cpp", "cpp")):
        rt = resolve_runtime(train.TrainConfig(device="cpu", compile_wrapper=given), DistInfo())
        assert rt.compile_wrapper == expected and rt.record(1)["compile_wrapper"] == expected


def test_the_cpp_wrapper_takes_the_python_wrappers_step(data, tmp_path, monkeypatch):
    """The default CPU step (no ``--compile-wrapper``) compiles with Inductor's C++ wrapper, its
    checks of the ops' output sizes and strides left out, its kernels built as a unit apart from
    the wrapper (an ``*.optimized.cpp`` in Inductor's cache, which the python wrapper's kernels
    never make), without line tables (no ``.debug_line`` in its libraries): one step of a
    two-group deep model (its oneDNN convolutions and GELUs where they can run, the Gaussian and
    likelihood ops, the fused AdamW) from the same weights on the same batch gives
    ``--compile-wrapper python``'s loss and weights, bit for bit."""
    assert without_twins(compile_options("default", torch.device("cpu"), "cpp")) == {
        "cpp_wrapper": True,
        "cpp_wrapper_build_separate": True,
        "size_asserts": False,
        "alignment_asserts": False,
        "aot_inductor.enable_line_tables": False,
    }
    argv = ["--data", data, *DEEP_TINY, "--layout", "1x1,32x1", "--batch-size", "16", "--limit-train", "16"]
    argv += ["--compile", "--channels-last", "--fused-optimizer", "--no-tensorboard", "--speed", "fixed"]
    real, options = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: options.append(kw["options"]) or real(m, **kw))
    results = []
    for name, flags in (("python", ["--compile-wrapper", "python"]), ("default", [])):
        torch._dynamo.reset()
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor" / name))
        t = train.Trainer(train.parse_args([*argv, "--out", str(tmp_path / name), *flags]))
        x = next(iter(t.loader))[0]
        torch.manual_seed(1)
        row = t.step_fn(x, torch.ones(t.model.num_levels)).row
        assert not t.step_fn.compile_failure
        results.append((row, [p.detach().clone() for p in t.model.parameters()]))
    assert [o.get("cpp_wrapper", False) for o in options] == [False, True]
    inductor_cache = tmp_path / "inductor" / "default"
    built_apart = list(inductor_cache.rglob("*.optimized.cpp"))
    assert built_apart, "the C++ wrapper was not built apart from its kernels"
    libraries = list(inductor_cache.rglob("*.so"))
    assert libraries and not [p.name for p in libraries if b".debug_line" in p.read_bytes()]
    (row_py, params_py), (row_cpp, params_cpp) = results
    # the loss and its terms, the gradient norms (the loss scale: NaN, no scaler), equal
    torch.testing.assert_close(row_cpp, row_py, rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(p, q) for p, q in zip(params_py, params_cpp, strict=True))
