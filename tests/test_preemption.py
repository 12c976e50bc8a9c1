"""Runs that survive preemption: SIGTERM/SIGINT save a mid-epoch checkpoint and stop (exit 75);
--checkpoint-every saves on a clock; --resume continues mid-epoch exactly; kill -9 never leaves a
corrupt checkpoint; under DDP every rank stops at the same step."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasthvae import train
from fasthvae.training.checkpoint import load_checkpoint
from fasthvae.training.loop import Stepper
from fasthvae.training.preemption import PREEMPTED_EXIT
from tests.helpers import SMALL, assert_same_state, torchrun

# 256 images, batch 32: 8 steps per epoch, 24 in all.
COMMON = [*SMALL, "--epochs", "3", "--limit-train", "256", "--no-compile", "--seed", "5", "--no-tensorboard"]


def argv(data: str, out: Path, *extra: str) -> list[str]:
    return ["--data", data, "--out", str(out), *COMMON, *extra]


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs trained the same, bit for bit (timings aside)."""
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert sa["step"] == sb["step"] and sa["progress"] is None and sb["progress"] is None
    timing = {"seconds": 0, "images_per_s": 0}
    assert [r | timing for r in sa["history"]] == [r | timing for r in sb["history"]]
    assert_same_state(sa, sb)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs to compare with, per loader."""
    runs = {}
    for loader in ("resident", "torch"):
        out = tmp_path_factory.mktemp(f"straight-{loader}")
        assert train.main(argv(data, out, "--loader", loader)) == 0
        runs[loader] = out
    return runs


@pytest.mark.parametrize("loader", ["resident", "torch"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_a_random_step_then_resume_equals_an_uninterrupted_run(
    data, tmp_path, monkeypatch, capsys, straight, loader, signum
):
    at = random.Random(f"{loader}{signum}").choice([s for s in range(1, 24) if s % 8])  # mid-epoch
    real = Stepper.__call__
    calls = {"n": 0}

    def signal_at_step(self, *args):
        result = real(self, *args)
        calls["n"] += 1
        if calls["n"] == at:  # the real signal, delivered to this process during the step
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(Stepper, "__call__", signal_at_step)
    assert train.main(argv(data, tmp_path, "--loader", loader)) == PREEMPTED_EXIT
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} in epoch {(at - 1) // 8 + 1} after batch" in err
    assert "--resume" in err
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == at and saved["progress"]["batch"] == at % 8 and saved["epoch"] == at // 8
    monkeypatch.setattr(Stepper, "__call__", real)
    assert train.main(argv(data, tmp_path, "--loader", loader, "--resume")) == 0
    assert_same_run(straight[loader], tmp_path)


def test_checkpoint_every_saves_mid_epoch(data, tmp_path, monkeypatch):
    saves = []
    real = train.Trainer._save

    def record_save(self):
        real(self)
        saves.append((self.state.epoch, self.state.progress.batch))

    monkeypatch.setattr(train.Trainer, "_save", record_save)
    assert train.main(argv(data, tmp_path, "--loader", "resident", "--checkpoint-every", "1e-9")) == 0
    mid_epoch = [s for s in saves if s[1]]
    assert len(mid_epoch) == 3 * 7, "a save after every step but each epoch's last (which saves anyway)"
    assert [s for s in saves if not s[1]] == [(1, 0), (2, 0), (3, 0)]


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fasthvae.train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def wait_for_mid_epoch_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    path = out / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file():
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_process_resumes_to_the_same_run(data, tmp_path, kill):
    """A real process, signalled from outside at whatever step it has reached: SIGTERM saves and
    exits 75; kill -9 gives no warning, and the last periodic checkpoint (every step here) is whole.
    (Batch 8: 32 steps per epoch, 96 in all.)"""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--data", data, *COMMON, "--loader", "resident", "--batch-size", "8"]
    straight = run_process("--out", str(whole), *common)  # as the others: one thread, a fresh process
    _, err = straight.communicate(timeout=240)
    assert straight.returncode == 0, err[-2000:]
    args = ["--out", str(split), *common, "--checkpoint-every", "1e-9"]
    proc = run_process(*args)
    wait_for_mid_epoch_checkpoint(split, proc)
    proc.send_signal(kill)
    _, err = proc.communicate(timeout=120)
    if kill == signal.SIGTERM:
        assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
        assert "stopped by SIGTERM" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(split / "checkpoint.pt")  # never corrupt: loads, whatever the moment
    assert 1 <= saved["step"] < 96
    resumed = run_process(*args, "--resume")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert not list(split.glob(".checkpoint.pt.*.tmp")), "a killed save's temp file is cleaned up"
    assert_same_run(whole, split)


DDP_SIGNAL_ON_RANK_1 = """
import os, signal, sys
import torch.distributed as dist
from fasthvae import train
from fasthvae.training.loop import Stepper
real = Stepper.__call__
calls = {"n": 0}
def signal_rank_1(self, *args):
    result = real(self, *args)
    calls["n"] += 1
    if calls["n"] == 3 and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return result
Stepper.__call__ = signal_rank_1
sys.exit(train.main(sys.argv[1:]))
"""


def test_ddp_ranks_stop_at_the_same_step_and_resume_exactly(data, tmp_path):
    """SIGTERM reaches rank 1 only, after its third step: both ranks save that step and exit 75; the
    resumed DDP run ends where an uninterrupted one does. (256 images, 2 ranks: 4 steps per epoch.)"""
    script = tmp_path / "signal_rank_1.py"
    script.write_text(DDP_SIGNAL_ON_RANK_1)
    args = [*COMMON, "--epochs", "2", "--data", data, "--loader", "resident"]
    stopped = torchrun(str(script), *args, "--out", str(tmp_path / "split"))
    assert stopped.returncode != 0 and re.search(r"exitcode\s*:\s*75", stopped.stderr), stopped.stderr[-3000:]
    saved = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert saved["step"] == 3 and saved["progress"]["batch"] == 3 and len(saved["rng"]) == 2
    resumed = torchrun("-m", "fasthvae.train", *args, "--out", str(tmp_path / "split"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = torchrun("-m", "fasthvae.train", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_run(tmp_path / "whole", tmp_path / "split")
