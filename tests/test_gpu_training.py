"""Training runs on CUDA (marked ``gpu``): fp16 with the GradScaler, every speed switch per model
(torch.compile with CUDA graphs), NCCL DDP on two GPUs. A step of the GPU self-check of their own:
their cold compiles take most of its time."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fasthvae import train
from fasthvae.training.checkpoint import load_checkpoint
from tests.helpers import SMALL

pytestmark = pytest.mark.gpu


def run(data: str, out, *extra: str) -> dict:
    argv = ["--data", data, "--out", str(out), *SMALL, "--epochs", "2", "--limit-train", "128"]
    assert train.main([*argv, "--device", "cuda", "--no-tensorboard", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_fp16_with_the_grad_scaler_trains(data, tmp_path):
    summary = run(data, tmp_path, "--amp", "--amp-dtype", "fp16")
    assert summary["runtime"]["amp_dtype"] == "torch.float16"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["scaler"]["scale"] > 0 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize("model", ["vae", "hvae", "deep"])
def test_every_speed_switch_on_cuda(data, tmp_path, model):
    extra = ["--model", model, "--amp", "--compile", "--loader", "resident", "--fused-optimizer"]
    extra += ["--compile-mode", "reduce-overhead"]
    if model == "deep":
        extra += ["--layout", "4x1,8x1,32x1", "--width", "16", "--zdim", "4"]
    summary = run(data, tmp_path, *extra)
    assert summary["runtime"]["device"].startswith("cuda") and summary["runtime"]["compile"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs two GPUs")
def test_nccl_ddp_two_gpus(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "fasthvae.train", "--data", data, "--out", str(tmp_path), *SMALL, "--epochs", "1"]
    cmd += ["--limit-train", "128", "--device", "cuda", "--iw-samples", "2"]
    cmd += ["--fid-samples", "16", "--fid-extractor", "fasthvae-tiny"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(load_checkpoint(tmp_path / "checkpoint.pt")["rng"]) == 2
