"""Shared test helpers: per-dtype tolerances and a float64 ground truth for the ops; a small model
that uses every op; the trainer's small configuration, runs in a fresh process and injected bad
steps; optional packages a test needs."""

import contextlib
import csv
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fasthvae import ops
from fasthvae.hardware import usable_cpu_flags
from fasthvae.nn import GaussianKL
from fasthvae.ops import backend, onednn_conv, reference
from fasthvae.selfcheck.plan import missing_packages

ROOT = Path(__file__).resolve().parents[1]  # the repository
CIFAR10 = ROOT.parent / "shared/data/cifar10/cifar10.npz"  # the real data set, where the checkout has it
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.gpu  # skipped without a GPU (conftest.py), selected by gpu_check.sh
# The cuda backend also needs fasthvae._C built with its CUDA kernels (setup.py says why it was not).
CUDA_KERNELS = GPU and backend.available("cuda", torch.device("cuda"))
needs_cuda_kernels = [
    needs_gpu,
    pytest.mark.skipif(GPU and not CUDA_KERNELS, reason="fasthvae._C was built without its CUDA kernels"),
]
# Triton runs compiled on CUDA tensors where there is a GPU, in its interpreter on CPU tensors
# elsewhere (TRITON_INTERPRET=1, set by conftest.py on machines without a GPU).
TRITON_DEVICE = "cuda" if GPU and not backend.triton_interpreted() else "cpu"

# fasthvae's C++ extension (fasthvae._C): the CPU kernels, the GELU, the multi-tensor loops.
needs_extension = pytest.mark.skipif(backend.extension() is None, reason="fasthvae._C is not built")
# The standalone oneDNN of fasthvae_onednn::conv2d and bench_onednn_calls (the ``onednn`` extra).
needs_onednn = pytest.mark.skipif(
    not onednn_conv.available(), reason=f"fasthvae_onednn cannot be built here: {onednn_conv.missing()}"
)
# oneDNN 3.2 has bfloat16 convolutions from AVX-512 with native bf16 on.
needs_avx512_bf16 = pytest.mark.skipif(
    "avx512_bf16" not in usable_cpu_flags(),
    reason="no native bf16 (avx512_bf16) on this CPU or under its ISA cap",
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One ulp of the output dtype (results are rounded once from float32); float32 allows for the
# few float32 operations inside. ATOL is relative to the largest expected magnitude.
RTOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float64: 1e-12}
ATOL = 1e-6


# Noise of two kernels differs by the transcendental functions of Box-Muller: r = sqrt(-2 log u),
# r cos(theta), r sin(theta). Compiled Triton uses sqrt.approx / ex2.approx and libdevice log, cos
# and sin (1-2 ulp each), the C++ kernels glibc's vector libm, the reference PyTorch's. Each term's
# error scales with the pair's radius r, not with the value (r cos(theta) near 0 is still off by
# about r * ulp(1)), so the tolerance is a number of float32 ulps of the radius.
NOISE_ULPS = 8


def noise_tolerance(seed: int, numel: int) -> torch.Tensor:
    """Per element of ``philox_randn(seed, numel)``: NOISE_ULPS ulps of its Box-Muller pair's radius."""
    from fasthvae.ops.philox import philox_randn

    pairs = philox_randn(seed, numel + (-numel) % 4).view(-1, 2).double()
    radius = pairs.norm(dim=1).repeat_interleave(2)[:numel]
    ulp = torch.finfo(torch.float32).eps * torch.exp2(torch.floor(torch.log2(radius)))
    return NOISE_ULPS * ulp


def subnormal_ulp(dtype: torch.dtype) -> float:
    """Spacing of the dtype's subnormal numbers: the resolution below its smallest normal."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", rtol: dict | None = None
) -> None:
    """Compare a result with its float64 ground truth, as tight as ``dtype`` allows (``rtol``: an
    op's own relative tolerances by dtype, where its conditioning needs them).

    Where the exact value overflows the result's dtype, the result must be infinite of the same sign;
    wherever it is representable, the result must be finite and close.
    """
    expected = expected.double()
    actual_d = actual.double()
    out_max = torch.finfo(actual.dtype).max
    rtol = max((rtol or RTOL)[dtype], RTOL[actual.dtype])
    overflow = expected.abs() > out_max * (1 + rtol)
    fits = expected.abs() < out_max * (1 - rtol)  # in between, rounding may go either way
    assert torch.isinf(actual_d[overflow]).all(), f"{what}: finite result where the exact value overflows"
    assert torch.isfinite(actual_d[fits]).all(), f"{what}: non-finite result where the exact value is finite"
    scale = expected[fits].abs().max().item() if fits.any() else 0.0
    torch.testing.assert_close(
        actual_d[fits],
        expected[fits],
        rtol=rtol,
        atol=ATOL * scale + subnormal_ulp(actual.dtype),
        msg=lambda m: f"{what}: {m}",
    )


def exact(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | None,
    logvar_p: torch.Tensor | None,
    reduction: str,
    eps: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
    """Float64 z, KL and gradients (autograd of the reference) for the given inputs and upstream grads."""
    leaves = [t.detach().double().requires_grad_() for t in (mu, logvar, mu_p, logvar_p) if t is not None]
    m, lv = leaves[0], leaves[1]
    mp, lvp = (leaves[2], leaves[3]) if mu_p is not None else (None, None)
    z = m + torch.exp(0.5 * lv) * eps.double() if eps is not None else None
    kl = reference.gaussian_kl(m, lv, mp, lvp, reduction) if grad_kl is not None else None
    loss = torch.zeros((), dtype=torch.float64)
    if z is not None:
        loss = loss + (z * grad_z.double()).sum()
    if kl is not None:
        loss = loss + (kl * grad_kl.double()).sum()
    grads = list(torch.autograd.grad(loss, leaves))
    return (None if z is None else z.detach()), (None if kl is None else kl.detach()), grads


def assert_non_finite_confined(
    grad_w: torch.Tensor, grad_b: torch.Tensor, out_channel: int, in_channel: int
) -> None:
    """A weight gradient [O, C, ...] from a NaN in grad_y's ``out_channel`` and an inf in x's
    ``in_channel``: NaN in all of the out channel's row and its bias, inf or NaN in all of the in
    channel's column, every other entry finite."""
    assert grad_w[out_channel].isnan().all() and grad_b[out_channel].isnan()
    assert not grad_w[:, in_channel].isfinite().any()
    keep = torch.ones_like(grad_w, dtype=torch.bool)
    keep[out_channel], keep[:, in_channel] = False, False
    assert grad_w[keep].isfinite().all() and grad_b[torch.arange(len(grad_b)) != out_channel].isfinite().all()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside (more threads than cores is allowed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def recording_backend(*targets) -> tuple[Callable, list[tuple[object, list]]]:
    """A ``torch.compile`` backend (AOTAutograd, the graphs run as traced) and the list it fills with
    (op, its arguments' example values) for every call of ``targets`` in the forward and backward
    graphs: the layouts a compiled step hands an op."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    calls: list[tuple[object, list]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        for target in targets:
            for node in gm.graph.find_nodes(op="call_function", target=target):
                calls.append(
                    (target, [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args])
                )
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), calls


def scale_loss_by_step(monkeypatch: pytest.MonkeyPatch, factor: Callable[[int], float]) -> dict[str, int]:
    """Multiply the training loss of the n-th objective call (from 1) by ``factor(n)``: NaN, huge
    or lasting gradients injected at chosen steps. Returns the call counter (``{"n": calls}``),
    which a test may reset between runs."""
    from fasthvae import train

    real = train.Objective.forward
    calls = {"n": 0}

    def scaled(self, x, weights, balance=None):
        calls["n"] += 1
        terms = real(self, x, weights, balance)
        terms["loss"] = terms["loss"] * factor(calls["n"])
        return terms

    monkeypatch.setattr(train.Objective, "forward", scaled)
    return calls


def requires(*modules: str) -> pytest.MarkDecorator:
    """Skip, naming them, when optional packages are missing (or hidden from the import system)."""
    absent = missing_packages(modules)
    return pytest.mark.skipif(bool(absent), reason=f"needs {', '.join(absent)} (not installed)")


class TinyHVAE(torch.nn.Module):
    """Two latent levels with a learned prior, using every op."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(12, 16)
        self.enc2 = torch.nn.Linear(8, 8)
        self.prior = torch.nn.Linear(4, 16)
        self.kl = GaussianKL(reduction="batchmean")

    def forward(self, x):
        mu1, lv1 = self.enc(x).chunk(2, dim=1)
        z1 = ops.reparameterize(mu1, lv1)
        mu2, lv2 = self.enc2(z1).chunk(2, dim=1)
        z2, kl2 = ops.sample_and_kl(mu2, lv2, reduction="batchmean")
        mu_p, lv_p = self.prior(z2).chunk(2, dim=1)
        return z1.square().mean() + self.kl(mu1, lv1, mu_p, lv_p) + kl2


# The trainer's small configuration: a few seconds an epoch on a 256-image set.
SMALL = [
    "--channels",
    "8",
    "--latent",
    "16",
    "--z1-channels",
    "4",
    "--batch-size",
    "32",
    "--limit-test",
    "64",
]
SMALL += ["--loader", "resident"]

# The deep model at its smallest: one latent group per resolution, 8 channels, 2 per latent.
DEEP_TINY = ["--model", "deep", "--layout", "1x1,4x1,8x1,16x1,32x1", "--width", "8", "--zdim", "2"]


# A training run whose speed probe (on rank 0 only: it fails elsewhere) finds channels_last off and
# the fused AdamW on faster, and that prints each rank's switches.
PROBE_ON_RANK_0 = """
import os
import sys
from fasthvae import train
from fasthvae.training import speed
speed.PROBE_MIN_STEPS = 1
def measure(config, rt, switch_sets):
    assert os.environ["RANK"] == "0", "a rank other than 0 probed"
    fast = lambda s: not s["channels_last"] and s["fused_optimizer"]
    return [speed.Candidate(s, 0.1, [0.08 if fast(s) else 0.1] * speed.ROUNDS) for s in switch_sets]
speed.measure = measure
init = train.Trainer.__init__
def report(self, *args, **kwargs):
    init(self, *args, **kwargs)
    print(f"rank {self.dist.rank}: {self.rt.channels_last} {self.rt.fused_optimizer}", flush=True)
train.Trainer.__init__ = report
sys.exit(train.main(sys.argv[1:]))
"""


# A training run that prints, on each rank after training, the Inductor wrapper its step compiled
# with, why compilation failed (None: it did not) and the sum of its parameters in float64.
PARAMETERS_OF_EACH_RANK = """
import sys
from fasthvae import train
run = train.Trainer.run
def run_then_report(self, *args, **kwargs):
    result = run(self, *args, **kwargs)
    total = sum(p.double().sum().item() for p in self.model.parameters())
    failure = self.step_fn.compile_failure
    print(f"rank {self.dist.rank}: {self.rt.compile_wrapper} {failure} {total!r}", flush=True)
    return result
train.Trainer.run = run_then_report
sys.exit(train.main(sys.argv[1:]))
"""


KILL_AFTER_FIRST_CHECKPOINT = """
import sys
from fasthvae import train
from fasthvae.data.dali import dali_available
real_save = train.Trainer._save
def save_then_die(self):
    real_save(self)
    raise KeyboardInterrupt  # killed right after the first epoch's checkpoint
train.Trainer._save = save_then_die
train.main(sys.argv[1:])
"""


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run folder's metrics.csv, one per epoch, as strings."""
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def run_process(*argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    """The trainer in a fresh process, as a user would run (and resume) it."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fasthvae.train"]
    return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=300)


def slow_rank_0_evaluation(module: str) -> str:
    """A script that runs ``python -m module`` (its ``main``) with the process group's timeout cut to
    8 s and rank 0's end-of-run evaluation taking 15 s: longer than the timeout."""
    return f"""
import datetime, importlib, sys, time
import torch.distributed as dist
from fasthvae import train
real_init, real_summarize = dist.init_process_group, train.Trainer.summarize
def short_timeout(*args, **kwargs):
    real_init(*args, **{{**kwargs, "timeout": datetime.timedelta(seconds=8)}})
def slow_summarize(self):
    time.sleep(15)
    return real_summarize(self)
dist.init_process_group, train.Trainer.summarize = short_timeout, slow_summarize
sys.exit(importlib.import_module("{module}").main(sys.argv[1:]))
"""


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (gloo on CPU, one thread a rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_same_state(a: dict, b: dict) -> None:
    """Model and optimizer states of two checkpoints are equal, bit for bit."""
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(b["optimizer"]["state"][index][name], value), (index, name)


def compile_with_backend(monkeypatch, backend) -> None:
    """torch.compile as the trainer calls it (Inductor's ``mode`` and ``options`` dropped), with
    ``backend`` instead of Inductor; Dynamo's caches reset so that no earlier graph is reused."""
    real = torch.compile

    def compile_with(model, mode=None, options=None, **kw):
        return real(model, backend=backend, **kw)

    monkeypatch.setattr(torch, "compile", compile_with)
    torch._dynamo.reset()


def make_compilation_fail(monkeypatch) -> None:
    """torch.compile with a backend that raises as a compiler crash does (Dynamo wraps the error
    in BackendCompilerFailed)."""

    def broken_backend(gm, example_inputs):
        raise RuntimeError("the compiler broke")

    compile_with_backend(monkeypatch, broken_backend)
