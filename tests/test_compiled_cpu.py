"""The fasthvae_cpu twins of the Python ops, and the compiled CPU graphs that call them."""

import pytest
import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

from fasthvae import ops
from fasthvae.ops import backend, compiled_cpu
from fasthvae.ops.reference import REDUCTIONS
from fasthvae.training.loop import compile_options
from tests.helpers import DTYPES

pytestmark = pytest.mark.skipif(backend.extension() is None, reason="needs fasthvae._C")

CPU = torch.device("cpu")


def gaussian_inputs(layout: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [4, 3, 5, 3] tensors: the channel halves of a conv head (``nchw``, ``channels_last``:
    strided views, as the models split their heads) or dense copies of them (``dense...``)."""
    channels_last = layout.endswith("channels_last")
    t = torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    a, b = t.chunk(2, 1)
    if layout.startswith("dense"):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
    return a, b


LAYOUTS = ["nchw", "channels_last", "dense", "dense_channels_last"]


def assert_identical(a, b) -> None:
    """The same tensors, bit for bit, laid out alike (or both None)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
        return
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_the_gaussian_twins_give_their_python_ops_bits(dtype, layout, prior, reduction):
    mu, logvar = gaussian_inputs(layout, dtype, 0)
    mu_p, logvar_p = gaussian_inputs(layout, dtype, 2) if prior else (None, None)
    seed = torch.tensor(1234)
    python, twin = torch.ops.fasthvae, torch.ops.fasthvae_cpu
    with torch.no_grad():
        assert_identical(
            twin.sample_and_kl(mu, logvar, mu_p, logvar_p, seed, reduction),
            python.sample_and_kl(mu, logvar, mu_p, logvar_p, seed, reduction),
        )
        assert_identical(
            twin.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction),
            python.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction),
        )
        assert_identical(twin.reparameterize(mu, logvar, seed), python.reparameterize(mu, logvar, seed))
        grad_z = torch.randn(mu.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        rows = reduction != "none"
        grad_kl = torch.randn(mu.shape[0]) if rows else torch.randn(mu.shape, dtype=dtype)
        for args in [
            (mu, logvar, mu_p, logvar_p, seed, grad_z, grad_kl, rows),
            (mu, logvar, mu_p, logvar_p, None, None, grad_kl, rows),
            (None, logvar, None, None, seed, grad_z, None, False),
        ]:
            expected = python.gaussian_backward(*args)
            if args[2] is None:
                assert_identical(twin.gaussian_backward(*args[:2], *args[4:]), expected)
            else:
                assert_identical(twin.gaussian_backward_with_prior(*args), expected)


def test_the_seed_twin_draws_what_the_python_op_draws():
    torch.manual_seed(7)
    python = [torch.ops.fasthvae.cpu_seed(2**63 - 1) for _ in range(3)]
    torch.manual_seed(7)
    twin = [torch.ops.fasthvae_cpu.cpu_seed(2**63 - 1) for _ in range(3)]
    assert_identical(twin, python)
    assert len({int(s) for s in twin}) == 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_mixture_twin_gives_the_python_ops_bits(dtype, channels_last):
    g = torch.Generator().manual_seed(3)
    params = torch.randn(2, 30, 5, 4, generator=g).to(dtype)
    if channels_last:
        params = params.contiguous(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (2, 3, 5, 4), generator=g).float() / 127.5 - 1
    twin, python = torch.ops.fasthvae_cpu, torch.ops.fasthvae
    assert_identical(twin.mixture_nll_with_grad(x, params), python.mixture_nll_with_grad(x, params))


def op_calls(fn) -> dict[str, int]:
    """How many ops of the two namespaces ``fn()`` calls through the dispatcher (the profiler's
    record of each call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    calls = {"fasthvae": 0, "fasthvae_cpu": 0}
    for event in prof.events():
        namespace = event.name.split("::")[0]
        if namespace in calls:
            calls[namespace] += 1
    return calls


def latent_step(h: torch.Tensor, head_weight: torch.Tensor, out_weight: torch.Tensor, x: torch.Tensor):
    """A latent group and a mixture likelihood, as the deep model's loss has them."""
    mu, logvar, mu_p, logvar_p = torch.nn.functional.conv2d(h, head_weight).chunk(4, 1)
    z, kl = ops.sample_and_kl(mu, logvar, mu_p, logvar_p)
    params = torch.nn.functional.conv2d(z, out_weight)
    return ops.mixture_nll(x, params, one_pass=True).sum() + kl.sum() + ops.gaussian_kl(mu, logvar).sum()


@pytest.mark.parametrize("wrapper", ["python", "cpp"])
def test_the_compiled_cpu_step_calls_only_the_twins_and_keeps_its_bits(wrapper):
    """Compiled with the trainer's CPU options, the step calls the twins and no Python op, forward
    and backward, and computes what the same graph compiled without the pass computes. Under the
    C++ wrapper no call goes back through Python (``custom_op_wrapper``), the shared backward's
    included (its twins return tuples)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    head_weight = (0.3 * torch.randn(16, 8, 1, 1, generator=g)).requires_grad_()
    out_weight = (0.3 * torch.randn(10, 4, 1, 1, generator=g)).requires_grad_()
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=g).float() / 127.5 - 1
    options = compile_options("default", CPU, wrapper)
    assert isinstance(options["post_grad_custom_post_pass"], compiled_cpu.CpuTwins)
    without = {k: v for k, v in options.items() if k != "post_grad_custom_post_pass"}
    results = {}
    for name, opts in [("twins", options), ("python ops", without)]:
        torch._dynamo.reset()
        step = torch.compile(latent_step, fullgraph=True, dynamic=False, options=opts)
        torch.manual_seed(5)
        with fresh_cache():  # compiles, and the code comes back
            _, code = run_and_get_code(lambda step=step: step(h, head_weight, out_weight, x).backward())
        assert len(code) == 2  # the forward and the backward graph
        calls_into_python = sum(c.count("custom_op_wrapper") for c in code)
        head_weight.grad = out_weight.grad = None
        torch.manual_seed(5)
        calls = op_calls(lambda step=step: step(h, head_weight, out_weight, x).backward())
        torch.manual_seed(5)
        loss = step(h, head_weight, out_weight, x)
        head_weight.grad = out_weight.grad = None
        loss.backward()
        results[name] = (loss.detach(), head_weight.grad, out_weight.grad), calls, calls_into_python
        head_weight.grad = out_weight.grad = None
    (values, calls, into_python), (values_without, calls_without, into_python_without) = (
        results["twins"],
        results["python ops"],
    )
    assert calls == {"fasthvae": 0, "fasthvae_cpu": 6}, calls  # seed, sample_and_kl, kl, mixture; 2 backward
    assert calls_without["fasthvae_cpu"] == 0 and calls_without["fasthvae"] > 0, calls_without
    if wrapper == "cpp":  # without the twins the shared backward's Tensor[] takes the way through Python
        assert into_python == 0 and into_python_without > 0, (into_python, into_python_without)
    assert_identical(values, values_without)


def kl_of(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.ops.fasthvae.gaussian_kl(mu, logvar, None, None, "sum")


@pytest.mark.parametrize("case", ["float64", "reference backend"])
def test_a_call_the_cpu_loops_do_not_run_keeps_its_python_op(case):
    """Float64 inputs, or the reference backend selected when the graph compiles: the Python op
    runs the reference formula there, and the pass leaves its call alone."""
    dtype = torch.float64 if case == "float64" else torch.float32
    mu, logvar = torch.randn(4, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    torch._dynamo.reset()
    options = compile_options("default", CPU, "python")
    kl = torch.compile(kl_of, fullgraph=True, dynamic=False, options=options)
    with backend.use_backend("reference" if case == "reference backend" else "auto"):
        kl(mu, logvar)  # compiles
        calls = op_calls(lambda: kl(mu, logvar))
    assert calls == {"fasthvae": 1, "fasthvae_cpu": 0}, calls
