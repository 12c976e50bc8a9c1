"""What only a GPU can check (marked ``gpu``: skipped with the reason elsewhere; ``bash
scripts/gpu_check.sh`` runs them with the rest of the GPU self-check): the ops on CUDA end to end,
CUDA graphs, device placement, the loaders on CUDA. The kernels on CUDA against the reference, and
Philox across backends, are in test_ops_kernels.py (its ``cuda`` and, on a GPU, ``triton`` cases);
training runs on CUDA in test_gpu_training.py."""

import contextlib
from collections.abc import Iterator

import pytest
import torch

from fasthvae import ops
from fasthvae.data import LoaderOptions, make_loader
from fasthvae.data.dali import dali_gpu_problem
from tests.helpers import TinyHVAE, needs_cuda_kernels

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def host_syncs_fail() -> Iterator[None]:
    """Every host-device synchronization inside raises (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    model = TinyHVAE().cuda()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(torch.randn(5, 12, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_each_gpu_backend_samples_like_the_cpu(backend):
    """The same seed gives the same noise on the GPU as on the CPU (the public API, end to end; a
    CPU generator's seed, which the op moves to the GPU)."""
    mu, lv = torch.randn(64, 257), torch.randn(64, 257)
    with ops.use_backend(backend):
        gpu = ops.reparameterize(mu.cuda(), lv.cuda(), generator=torch.Generator().manual_seed(3)).cpu()
    cpu = ops.reparameterize(mu, lv, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_a_cuda_graph_replays_fresh_noise_without_host_syncs(backend):
    """CUDA inputs draw their seed on the GPU and the kernels read it there: a call syncs with the
    host nowhere, and a captured CUDA graph draws new noise on every replay."""
    mu = torch.zeros(64, 128, device="cuda")
    lv = torch.zeros_like(mu)
    leaves = [t.clone().requires_grad_() for t in (mu, lv)]
    with ops.use_backend(backend):
        with host_syncs_fail():
            z, kl = ops.sample_and_kl(*leaves)
            (z.sum() + kl.sum()).backward()
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_cuda_kernels)])
def test_kernels_launch_on_the_inputs_gpu(backend):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (a launch on the current
    device would read cuda:1 memory from cuda:0)."""
    mu, lv = torch.randn(64, 257), torch.randn(64, 257)
    with ops.use_backend(backend), torch.cuda.device(0):
        z = ops.reparameterize(mu.to("cuda:1"), lv.to("cuda:1"), generator=torch.Generator().manual_seed(3))
        kl = ops.gaussian_kl(mu.to("cuda:1"), lv.to("cuda:1"))
    assert z.device == kl.device == torch.device("cuda:1")
    cpu_z = ops.reparameterize(mu, lv, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z.cpu(), cpu_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.cpu(), ops.gaussian_kl(mu, lv), rtol=1e-5, atol=1e-5)


def test_reference_kernels_on_cuda_never_sync():
    """The reference fallback on CUDA tensors (here forced; float64 takes it too) reads the seed on
    the GPU: no host sync in the forward or the backward."""
    leaves = [torch.randn(64, 128, device="cuda", requires_grad=True) for _ in range(2)]
    with ops.use_backend("reference"), host_syncs_fail():
        z, kl = ops.sample_and_kl(*leaves)
        (z.sum() + kl.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def images(n: int = 203):
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8).numpy()


def test_resident_loader_on_cuda_matches_cpu():
    data = images()
    options = LoaderOptions(batch_size=32, flip=False, seed=2)
    cpu, gpu = (make_loader("resident", data, options, device) for device in ("cpu", "cuda"))
    for (xc, ic), (xg, ig) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(ic, ig.cpu()) and torch.equal(xc, xg.cpu())


def test_dali_gpu_graph_matches_the_cpu_graph():
    problem = dali_gpu_problem()
    if problem:  # not installed, or a driver older than DALI's CUDA
        pytest.skip(problem)
    data = images()
    options = LoaderOptions(batch_size=32, seed=2)  # no augmentation: the graphs must agree exactly
    cpu, gpu = (make_loader("dali", data, options, device) for device in ("cpu", "cuda"))
    for (xc, ic), (xg, ig) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(ic, ig.cpu())
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
