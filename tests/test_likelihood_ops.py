"""The fused discretized-logistic likelihoods (``ops.mixture_nll``, ``ops.logistic_nll``): every
kernel backend against the float64 reference formula, values and gradients."""

import contextlib
import math

import pytest
import torch

from fasthvae import ops
from fasthvae.ops import backend, library_likelihoods, reference
from fasthvae.ops.reference import REDUCTIONS
from tests.helpers import DTYPES, TRITON_DEVICE, assert_close, needs_extension, torch_threads

CPU_KERNELS = tuple(f"cpu-{isa}" for isa in backend.cpu_isas()) if backend.extension() else ("cpu",)
KERNELS = (*CPU_KERNELS, "triton")  # the fused kernels; the reference backend is the formula itself
# Every dtype with the per-pixel result and the per-image sums; the other reductions (PyTorch sums
# of the same kernel output) in float32.
DTYPE_REDUCTIONS = [(d, r) for d in DTYPES for r in ("none", "sample")]
DTYPE_REDUCTIONS += [(torch.float32, r) for r in REDUCTIONS if r not in ("none", "sample")]


# float32 arithmetic of the likelihoods is conditioned by the scale: x - mean carries up to four
# roundings of numbers near 1 (tanh, the coupling's product and sum, the difference: 4 * 2^-24) and
# the inverse scale, up to e^7 at the clamp, multiplies them. Low-precision parameters are bounded
# by their outputs' one rounding, as every op's.
RTOL = {torch.float32: 4 * 2**-24 * math.exp(7), torch.float16: 2**-10, torch.bfloat16: 2**-7}


# Triton's interpreter rounds float32 to bfloat16 toward zero (measured: 2878.66 is stored as 2864,
# not 2880), up to one ulp where compiled Triton rounds to nearest: its bfloat16 outputs get two.
INTERPRETED = {**RTOL, torch.bfloat16: 2**-6}


def rtol_of(kernel: str) -> dict:
    return INTERPRETED if kernel == "triton" and TRITON_DEVICE == "cpu" else RTOL


def device_of(kernel: str) -> str:
    return TRITON_DEVICE if kernel == "triton" else "cpu"


@contextlib.contextmanager
def kernel_in_use(kernel: str):
    name, _, isa = kernel.partition("-")
    with backend.use_backend(name), backend.use_cpu_isa(isa) if isa else contextlib.nullcontext():
        yield


def mixture_inputs(b, k, h, w, dtype=torch.float32, seed=0, extreme=False):
    """x with every row's first pixels at the edge values 0 and 255, and parameters in the ranges a
    decoder produces (``extreme``: clamped and huge log-scales, huge logits and coefficients, means
    far outside [-1, 1], so bins of mass below 1e-5 take the density branch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255
    x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, 1.0
    logits = torch.randn(b, k, h, w, generator=g) * 3
    means = torch.randn(b, 3 * k, h, w, generator=g) * 0.8
    log_scales = torch.rand(b, 3 * k, h, w, generator=g) * 7 - 6
    coeffs = torch.randn(b, 3 * k, h, w, generator=g)
    if extreme:
        choose = torch.randint(0, 5, log_scales.shape, generator=g)
        table = torch.tensor([-12.0, -7.0, -6.99, 6.0, 12.0])
        log_scales = table[choose]
        logits = logits * 15
        coeffs = coeffs * 20
        means = means * 6
    return x, torch.cat([logits, means, log_scales, coeffs], 1).to(dtype)


def reduced_upstream(nll_shape, reduction, seed=7):
    g = torch.Generator().manual_seed(seed)
    if reduction == "none":
        return torch.randn(nll_shape, generator=g)
    if reduction == "sample":
        return torch.randn(nll_shape[0], generator=g)
    return torch.randn((), generator=g)


def run_mixture(kernel, x, params, reduction, grad, view=lambda t: t, one_pass=False):
    leaf = params.detach().to(device_of(kernel)).requires_grad_()
    with kernel_in_use(kernel):
        out = ops.mixture_nll(x.to(leaf.device), view(leaf), reduction=reduction, one_pass=one_pass)
        (d_params,) = torch.autograd.grad((out.double() * grad.to(leaf.device).double()).sum(), leaf)
    return out.cpu(), d_params.cpu()


def exact_mixture(x, params, reduction, grad):
    leaf = params.detach().double().requires_grad_()
    out = reference.reduce(reference.mixture_nll(x.double(), leaf), reduction, torch.float64)
    (d_params,) = torch.autograd.grad((out * grad.double()).sum(), leaf)
    return out, d_params


def check_mixture(
    kernel, dtype, reduction, shape=(2, 3, 5, 7), extreme=False, view=lambda t: t, one_pass=False
):
    x, params = mixture_inputs(*shape, dtype=dtype, extreme=extreme)
    grad = reduced_upstream((shape[0], shape[2], shape[3]), reduction)
    out, d_params = run_mixture(kernel, x, params, reduction, grad, view, one_pass)
    want, d_want = exact_mixture(x, params, reduction, grad)
    assert out.dtype == (dtype if reduction == "none" else torch.float32) and out.shape == want.shape
    assert_close(out, want, dtype, "nll", rtol_of(kernel))
    assert d_params.dtype == dtype and d_params.shape == params.shape
    assert_close(d_params, d_want, dtype, "d params", rtol_of(kernel))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("dtype", "reduction"), DTYPE_REDUCTIONS, ids=str)
def test_mixture_values_and_grads(kernel, dtype, reduction):
    check_mixture(kernel, dtype, reduction)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize(("dtype", "reduction"), DTYPE_REDUCTIONS, ids=str)
@pytest.mark.parametrize("extreme", [False, True], ids=["typical", "extreme"])
def test_mixture_in_one_pass_values_and_grads(kernel, dtype, reduction, extreme):
    """``one_pass`` (the one-pass op on the CPU loops) against the float64 formula as well."""
    check_mixture(kernel, dtype, reduction, extreme=extreme, view=channels_last, one_pass=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixture_extreme_scales_logits_and_coefficients(kernel, dtype):
    check_mixture(kernel, dtype, "none", extreme=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 2, 3), (2, 10, 1, 33), (1, 4, 13, 11)], ids=str)
def test_mixture_odd_shapes(kernel, shape):
    check_mixture(kernel, torch.float32, "sample", shape=shape)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixture_large(kernel):
    """CIFAR-10's decoder output at batch 8 (Triton in its interpreter, whose time grows with the
    pixels: batch 1, eight programs)."""
    b = 1 if kernel == "triton" and TRITON_DEVICE == "cpu" else 8
    check_mixture(kernel, torch.float32, "sample", shape=(b, 10, 32, 32))


def contiguous(t):
    return t


def channels_last(t):
    return t.contiguous(memory_format=torch.channels_last)


def strided(t):
    """A view with gaps in every dim but the batch: a slice of a wider tensor's channels and columns."""
    b, c, h, w = t.shape
    wide = torch.zeros(b, c + 4, h, 2 * w, dtype=t.dtype, device=t.device)
    wide[:, 4:, :, ::2] = t
    return wide[:, 4:, :, ::2]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", [channels_last, strided], ids=["channels_last", "strided"])
def test_mixture_reads_any_layout_and_returns_the_gradient_in_it(kernel, layout):
    check_mixture(kernel, torch.float32, "none", view=layout)
    x, params = (t.to(device_of(kernel)) for t in mixture_inputs(2, 3, 5, 7))
    with kernel_in_use(kernel):
        plain = ops.mixture_nll(x, params, reduction="none")
        assert torch.equal(ops.mixture_nll(layout(x), layout(params), reduction="none"), plain)
        nhwc = channels_last(params)
        nll, lse = library_likelihoods.mixture_nll(x, nhwc)
        grad = library_likelihoods.mixture_nll_backward(x, nhwc, nll, lse, torch.ones_like(nll))
    assert grad.is_contiguous(memory_format=torch.channels_last)


@needs_extension
@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layout", [contiguous, channels_last, strided], ids=["contiguous", "channels_last", "strided"]
)
def test_the_one_pass_op_is_the_forward_and_the_backward_op(kernel, dtype, layout):
    """mixture_nll_with_grad, which ops.mixture_nll runs on the CPU loops where the parameters need a
    gradient: mixture_nll's -log P, bit for bit, and mixture_nll_backward's gradient for a unit
    upstream gradient (to the rounding of the logsumexp of the joints, which the backward pass
    recovers from the forward's two outputs), in float32 (rounded once to the parameters' dtype
    after the backward pass's product), laid out as it lays it out."""
    x, params = mixture_inputs(2, 10, 9, 11, dtype=dtype)
    params = layout(params)
    with kernel_in_use(kernel):
        nll, d_params = library_likelihoods.mixture_nll_with_grad(x, params)
        nll_twice, lse = library_likelihoods.mixture_nll(x, params)
        d_twice = library_likelihoods.mixture_nll_backward(x, params, nll_twice, lse, torch.ones_like(nll))
    assert torch.equal(nll, nll_twice)
    assert d_params.dtype == torch.float32 and d_params.stride() == d_twice.stride()
    assert_close(d_params.to(dtype), d_twice.double(), dtype, "d params", RTOL)


def logistic_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, shape, generator=g).float() / 255
    x.view(-1)[:2] = torch.tensor([0.0, 1.0])
    mean = torch.randn(shape, generator=g) * 0.8
    log_scale = torch.rand(shape, generator=g) * 9 - 8  # [-8, 1]: the clamp at -7 included
    return x, mean.to(dtype), log_scale.to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("dtype", "reduction"), DTYPE_REDUCTIONS, ids=str)
def test_logistic_values_and_grads(kernel, dtype, reduction):
    shape = (3, 3, 7, 9)
    x, mean, log_scale = logistic_inputs(shape, dtype)
    grad = reduced_upstream(shape, reduction)
    leaves = [t.to(device_of(kernel)).requires_grad_() for t in (mean, log_scale)]
    with kernel_in_use(kernel):
        out = ops.logistic_nll(x.to(leaves[0].device), *leaves, reduction=reduction)
        got = torch.autograd.grad((out.double() * grad.to(out.device).double()).sum(), leaves)
    exact = [t.double().requires_grad_() for t in (mean, log_scale)]
    want = reference.reduce(reference.logistic_nll(x.double(), *exact), reduction, torch.float64)
    want_grads = torch.autograd.grad((want * grad.double()).sum(), exact)
    assert out.dtype == (dtype if reduction == "none" else torch.float32)
    assert_close(out.cpu(), want, dtype, "nll", rtol_of(kernel))
    for name, g_got, g_want in zip(("d mean", "d log_scale"), got, want_grads, strict=True):
        assert g_got.dtype == dtype
        assert_close(g_got.cpu(), g_want, dtype, name, rtol_of(kernel))


@pytest.mark.parametrize("kernel", KERNELS)
def test_logistic_channels_last_and_broadcast(kernel):
    x, mean, log_scale = (t.to(device_of(kernel)) for t in logistic_inputs((2, 3, 5, 6), torch.float32))
    with kernel_in_use(kernel):
        plain = ops.logistic_nll(x, mean, log_scale, reduction="none")
        cl = ops.logistic_nll(*(channels_last(t) for t in (x, mean, log_scale)), reduction="none")
        assert cl.is_contiguous(memory_format=torch.channels_last)
        # an element's place in the SIMD loop moves with the layout: the vector and the scalar libm
        # may differ in the last bits
        torch.testing.assert_close(cl, plain, rtol=RTOL[torch.float32], atol=0)
        shared = ops.logistic_nll(x, mean[:1], log_scale[:1], reduction="none")  # broadcast over the batch
        assert torch.equal(
            shared, ops.logistic_nll(x, mean[:1].expand_as(x), log_scale[:1].expand_as(x), reduction="none")
        )


def test_mixture_sums_to_one_over_every_value_of_a_pixel():
    """Sum of P(r, g, b) over all 256^3 triples of one pixel: 16.7 million evaluations of the fused
    CPU kernel (its best ISA path), for a typical, a sharp and a wide mixture of 10 components."""
    values = torch.arange(256, dtype=torch.float32) / 255
    red, green, blue = torch.meshgrid(values, values, values, indexing="ij")
    x = torch.stack([red, green, blue]).reshape(1, 3, 4096, 4096)
    for seed, shift in [(0, 0.0), (1, -4.0), (2, 2.5)]:
        _, params = mixture_inputs(1, 10, 1, 1, seed=seed)
        params[:, 40:70] += shift  # the log-scales
        nll = ops.mixture_nll(x, params.expand(-1, -1, 4096, 4096), reduction="none")
        assert torch.exp(-nll.double()).sum().item() == pytest.approx(1.0, abs=2e-5)


def test_float64_runs_the_reference_formula_inside_the_ops():
    x, params = mixture_inputs(2, 2, 3, 3, dtype=torch.float64)
    params.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.mixture_nll(x, p, reduction="none"), (params,))
    xl, mean, log_scale = logistic_inputs((2, 3, 3), torch.float64)
    mean.requires_grad_(), log_scale.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s: ops.logistic_nll(xl, m, s, reduction="none"), (mean, log_scale)
    )


def test_reference_backend_is_the_plain_formula():
    x, params = mixture_inputs(2, 3, 4, 5)
    with backend.use_backend("reference"):
        got = ops.mixture_nll(x, params, reduction="none")
    assert torch.equal(got, reference.mixture_nll(x, params))


def test_backward_saves_no_per_component_tensors():
    """The autograd graph keeps the inputs and two float32 values per pixel, nothing [B, 3, K, H, W]."""
    x, params = mixture_inputs(2, 10, 8, 8)
    params.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.mixture_nll(x, params)
    pixels = 2 * 8 * 8
    assert sum(t.numel() for t in saved) <= params.numel() + x.numel() + 2 * pixels


def test_opcheck_and_compile_fullgraph():
    x, params = mixture_inputs(2, 3, 4, 5)
    params.requires_grad_()
    torch.library.opcheck(library_likelihoods.mixture_nll, (x, params))
    if backend.extension():
        torch.library.opcheck(library_likelihoods.mixture_nll_with_grad, (x, params))
    xl, mean, log_scale = logistic_inputs((2, 3, 4, 5), torch.float32)
    torch.library.opcheck(
        library_likelihoods.logistic_nll, (xl, mean.requires_grad_(), log_scale.requires_grad_())
    )
    torch._dynamo.reset()

    for one_pass in (False, True):
        torch._dynamo.reset()

        def loss(p, m, s, one_pass=one_pass):
            return ops.mixture_nll(x, p, one_pass=one_pass).sum() + ops.logistic_nll(xl, m, s).sum()

        explain = torch._dynamo.explain(loss)(params, mean, log_scale)
        assert explain.graph_break_count == 0
        nodes = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
        # params need a gradient: in one pass on the CPU loops the one-pass op, else the forward op
        mixture = "mixture_nll_with_grad" if one_pass and backend.extension() else "mixture_nll"
        assert {f"fasthvae.{mixture}.default", "fasthvae.logistic_nll.default"} <= nodes
        compiled = torch.compile(loss, fullgraph=True)
        got = torch.autograd.grad(compiled(params, mean, log_scale), (params, mean, log_scale))
        want = torch.autograd.grad(loss(params, mean, log_scale), (params, mean, log_scale))
        for g_got, g_want in zip(got, want, strict=True):
            torch.testing.assert_close(g_got, g_want)


def test_clear_errors():
    x, params = mixture_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"params must be \[B, 10K, H, W\]"):
        ops.mixture_nll(x, params[:, :29])
    with pytest.raises(ValueError, match=r"x must be \[2, 3, 4, 5\]"):
        ops.mixture_nll(x[:, :2], params)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.mixture_nll((x * 255).to(torch.uint8), params)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.mixture_nll(x, params, reduction="max")
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.logistic_nll(x, params[:, :4], params[:, :4])


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("layout", [contiguous, channels_last], ids=["contiguous", "channels_last"])
def test_cpu_mixture_gives_the_same_bits_on_any_thread_count(kernel, layout):
    """One thread and five split the pixels' chunks differently and give equal values and gradients
    (the in-place path of contiguous float32 parameters and the staged one of channels_last)."""
    x, params = mixture_inputs(4, 10, 31, 33)  # rows of several chunks, the last one partial
    for reduction in ("none", "sample"):
        grad = reduced_upstream((4, 31, 33), reduction)
        with torch_threads(1):
            one = run_mixture(kernel, x, params, reduction, grad, layout)
        with torch_threads(5):
            five = run_mixture(kernel, x, params, reduction, grad, layout)
        assert all(torch.equal(a, b) for a, b in zip(one, five, strict=True))


def test_the_reference_gradient_is_zero_at_the_log_scale_clamp():
    """At log-scale -7 itself the reference's gradient is zero, as the kernels' (it is written out,
    not left to torch.clamp's choice of subgradient at its bound)."""
    log_scale = torch.tensor([-7.0, -6.5, -7.5], dtype=torch.float64, requires_grad=True)
    x = torch.full((3,), 0.5, dtype=torch.float64)
    nll = reference.logistic_nll(x, torch.zeros(3, dtype=torch.float64), log_scale)
    (d,) = torch.autograd.grad(nll.sum(), log_scale)
    assert d[0] == 0 and d[2] == 0 and d[1] != 0
