"""What only a GPU can check (marked ``gpu``: skipped with the reason elsewhere; ``bash
scripts/gpu_check.sh`` runs them with the rest of the GPU self-check). The kernels on CUDA against
the reference, and Philox across backends, are in test_ops_kernels.py (its ``cuda`` and, on a GPU,
``triton`` cases)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fasthvae import ops, train
from fasthvae.data import LoaderOptions, make_loader
from fasthvae.data.dali import dali_available
from fasthvae.training.checkpoint import load_checkpoint
from tests.test_ops_api import TinyHVAE
from tests.test_train import SMALL

pytestmark = pytest.mark.gpu


def test_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    model = TinyHVAE().cuda()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(torch.randn(5, 12, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_each_gpu_backend_samples_like_the_cpu(backend):
    """The same seed gives the same noise on the GPU as on the CPU (the public API, end to end; a
    CPU generator's seed, which the op moves to the GPU)."""
    mu, lv = torch.randn(64, 257), torch.randn(64, 257)
    with ops.use_backend(backend):
        gpu = ops.reparameterize(mu.cuda(), lv.cuda(), generator=torch.Generator().manual_seed(3)).cpu()
    cpu = ops.reparameterize(mu, lv, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_cuda_graph_replays_fresh_noise_without_host_syncs(backend):
    """CUDA inputs draw their seed on the GPU and the kernels read it there: a call syncs with the
    host nowhere, and a captured CUDA graph draws new noise on every replay."""
    mu = torch.zeros(64, 128, device="cuda")
    lv = torch.zeros_like(mu)
    leaves = [t.clone().requires_grad_() for t in (mu, lv)]
    with ops.use_backend(backend):
        torch.cuda.set_sync_debug_mode("error")
        try:
            z, kl = ops.sample_and_kl(*leaves)
            (z.sum() + kl.sum()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops.sample_and_kl(mu, lv)  # warm-up off the capturing stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            z, kl = ops.sample_and_kl(mu, lv)
        graph.replay()
        first = z.clone()
        graph.replay()
    assert not torch.equal(first, z)
    assert abs(float(first.std()) - 1.0) < 0.05 and abs(float(z.std()) - 1.0) < 0.05


def images(n: int = 203):
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8).numpy()


def test_resident_loader_on_cuda_matches_cpu():
    data = images()
    options = LoaderOptions(batch_size=32, flip=False, seed=2)
    cpu, gpu = (make_loader("resident", data, options, device) for device in ("cpu", "cuda"))
    for (xc, ic), (xg, ig) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(ic, ig.cpu()) and torch.equal(xc, xg.cpu())


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 is not installed")
def test_dali_gpu_graph_matches_the_cpu_graph():
    data = images()
    options = LoaderOptions(batch_size=32, seed=2)  # no augmentation: the graphs must agree exactly
    cpu, gpu = (make_loader("dali", data, options, device) for device in ("cpu", "cuda"))
    for (xc, ic), (xg, ig) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(ic, ig.cpu())
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)


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
