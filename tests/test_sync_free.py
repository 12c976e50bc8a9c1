"""The sync-free step: with the fused AdamW the step never reads a value back to the host (its skip
decision, threshold, EMA update and the epoch's sums stay on the device), and it trains exactly as
the step that decides on the host."""

import sys

import pytest
import torch

from fasthvae import train
from fasthvae.training.checkpoint import load_checkpoint
from tests.helpers import SMALL, assert_same_state, scale_loss_by_step

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


# The ops' seeds come from the CPU generator on every device (host values: no GPU work to wait for).
HOST_BORN = {"_seed_value"}


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of a tensor's value by Python code (on a GPU each one waits for the queue)."""
    counter = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            counter["n"] += sys._getframe(1).f_code.co_name not in HOST_BORN
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter


def trainer(data, out, *extra):
    argv = ["--data", data, "--out", str(out), *SMALL, "--epochs", "1", "--no-compile", "--no-tensorboard"]
    config = train.parse_args([*argv, "--ema", "0.99", "--skip-factor", "10", *extra])
    return train.Trainer(config)


def reads_per_epoch(data, tmp_path, host_reads, images: int, *extra) -> int:
    t = trainer(data, tmp_path / f"run{images}", "--limit-train", str(images), *extra)
    policy = train.StopPolicy(train.StopSignals(), None, t.dist, t.rt.device)
    before = host_reads["n"]
    row = t._run_epoch(policy, None)
    assert row["epoch"] == 1
    return host_reads["n"] - before


def test_the_step_never_reads_back_to_the_host(data, tmp_path, host_reads):
    """Epochs of 4 and 8 steps read back equally often: every read is per epoch (one read-back of
    the records with --log-every beyond the epoch, the epoch's sums), none per step."""
    fused = ("--fused-optimizer", "--log-every", "1000")
    short = reads_per_epoch(data, tmp_path, host_reads, 128, *fused)
    long = reads_per_epoch(data, tmp_path, host_reads, 256, *fused)
    assert short == long, f"{long - short} reads in 4 more steps"
    unfused = ("--no-fused-optimizer", "--log-every", "1000")  # the counter sees per-step reads
    short = reads_per_epoch(data, tmp_path, host_reads, 128, *unfused)
    long = reads_per_epoch(data, tmp_path, host_reads, 256, *unfused)
    assert long - short >= 4, "the unfused step reads (its skip decision at least) every step"


def test_one_step_alone_reads_nothing(data, tmp_path, host_reads):
    t = trainer(data, tmp_path, "--limit-train", "64", "--fused-optimizer")
    x = next(iter(t.loader))[0]
    weights = torch.ones(t.model.num_levels)
    t.step_fn(x, weights)  # warm-up: lazy optimizer state
    before = host_reads["n"]
    result = t.step_fn(x, weights)
    assert host_reads["n"] == before and result.taken.dtype == torch.bool


@pytest.mark.parametrize("log_every", ["1", "7"])
def test_device_and_host_decisions_train_alike(data, tmp_path, monkeypatch, log_every):
    """A NaN step (3), a spike above the adaptive threshold (26) and normal steps, 32 in all: the
    sync-free step and the host-decided one end with equal parameters, optimizer and EMA states,
    metrics and skip records (fused AdamW both)."""
    calls = scale_loss_by_step(monkeypatch, lambda n: {3: float("nan"), 26: 1e6}.get(n, 1.0))
    runs = {}
    for sync_free in (True, False):
        out = tmp_path / f"sync_free_{sync_free}"
        t = trainer(data, out, "--batch-size", "8", "--fused-optimizer", "--log-every", log_every)
        t.step_fn.sync_free = sync_free
        calls["n"] = 0
        t.run()
        runs[sync_free] = out
    a, b = (load_checkpoint(runs[k] / "checkpoint.pt") for k in (True, False))
    assert a["history"][0]["skipped_steps"] == b["history"][0]["skipped_steps"] == 2
    timing = {"seconds": 0, "images_per_s": 0}
    assert [r | timing for r in a["history"]] == [r | timing for r in b["history"]]
    assert_same_state(a, b)
    assert all(torch.equal(v, b["ema"]["model"][k]) for k, v in a["ema"]["model"].items())
    assert a["ema"]["updates"] == b["ema"]["updates"] == 30 and a["skip"] == b["skip"]
    skips = [(runs[k] / "skips.jsonl").read_text() for k in (True, False)]
    assert skips[0] == skips[1] and '"term": "loss"' in skips[0] and "above threshold" in skips[0]


@pytest.mark.gpu
def test_a_cuda_step_never_synchronizes(data, tmp_path):
    """On a GPU: torch's sync debug mode turns any device-to-host wait in the step into an error."""
    t = trainer(data, tmp_path, "--device", "cuda", "--limit-train", "64", "--amp")
    x = next(iter(t.loader))[0]
    weights = torch.ones(t.model.num_levels, device="cuda")
    t.step_fn(x, weights)  # warm-up: lazy optimizer state, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.step_fn(x, weights)
    finally:
        torch.cuda.set_sync_debug_mode(0)
