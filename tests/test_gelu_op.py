"""fasthvae.ops.gelu, the GELU that keeps its derivative, against the float64 GELU on every CPU ISA
path: values and gradients, layouts, extremes, threads, compilation; and its loops vectorized."""

import platform
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._prims_common import is_non_overlapping_and_dense_or_false, suggest_memory_format

from fasthvae import ops
from fasthvae.nn import conv_input_gelu
from fasthvae.ops import activation, backend
from tests.helpers import DTYPES, assert_close, needs_extension, torch_threads

pytestmark = needs_extension
ISAS = tuple(backend.cpu_isas()) if backend.extension() else ()
CL = torch.channels_last


def exact(x: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu(x) and its gradient in float64 (autograd of F.gelu)."""
    xd = x.detach().double().requires_grad_()
    y = F.gelu(xd)
    (grad,) = torch.autograd.grad(y, xd, grad_y.double())
    return y.detach(), grad


def run(x: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = ops.gelu(x)
    (grad,) = torch.autograd.grad(y, x, grad_y)
    return y.detach(), grad


def inputs(shape, dtype):
    """x ~ N(0, 9) (the GELU's bend and both tails) and an upstream gradient, in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=g) * 3).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 33, 7), (2, 4100)], ids=["7", "odd_4d", "two_blocks"])
def test_values_and_gradients(isa, dtype, shape):
    x, grad_y = inputs(shape, dtype)
    assert activation.fused_gelu_runs(x)
    with backend.use_cpu_isa(isa):
        y, grad = run(x, grad_y)
    y_exact, grad_exact = exact(x, grad_y)
    assert y.dtype == grad.dtype == dtype
    assert_close(y, y_exact, dtype, "gelu")
    assert_close(grad, grad_exact, dtype, "gradient")


@pytest.mark.parametrize("isa", ISAS)
def test_large_tensors_give_the_same_bits_on_any_thread_count(isa):
    """Fixed blocks of elements a task: one thread and five give equal values and gradients, and both
    are close to the float64 GELU."""
    x, grad_y = inputs((3, 64, 70, 71), torch.float32)
    results = []
    for n in (1, 5):
        with backend.use_cpu_isa(isa), torch_threads(n):
            results.append(run(x, grad_y))
    (y1, g1), (y5, g5) = results
    assert torch.equal(y1, y5) and torch.equal(g1, g5)
    y_exact, grad_exact = exact(x, grad_y)
    assert_close(y1, y_exact, torch.float32, "gelu")
    assert_close(g1, grad_exact, torch.float32, "gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_is_walked_as_it_lies(dtype):
    """A dense channels_last input: outputs and gradient channels_last, equal to those of its NHWC
    twin (the same memory walked in the same order)."""
    x, grad_y = inputs((2, 9, 5, 6), dtype)
    x_cl, grad_cl = x.contiguous(memory_format=CL), grad_y.contiguous(memory_format=CL)
    y, grad = run(x_cl, grad_cl)
    y_twin, grad_twin = run(x_cl.permute(0, 2, 3, 1).contiguous(), grad_cl.permute(0, 2, 3, 1).contiguous())
    assert y.stride() == x_cl.stride() and grad.is_contiguous(memory_format=CL)
    assert torch.equal(y.permute(0, 2, 3, 1), y_twin) and torch.equal(grad.permute(0, 2, 3, 1), grad_twin)


@pytest.mark.parametrize(
    "layout",
    [lambda t: t[:, ::2], lambda t: t.transpose(1, 3)[:, 1:], lambda t: t[:, :1].expand(-1, 6, -1, -1)],
    ids=["strided_slice", "transposed_slice", "expanded"],
)
def test_inputs_with_gaps_are_made_dense_first(layout):
    """Inputs that are not dense go through ``contiguous`` (their suggested memory format): the same
    values and gradient as the op on that copy."""
    x, _ = inputs((2, 12, 5, 7), torch.float32)
    view = layout(x)
    assert not is_non_overlapping_and_dense_or_false(view)
    grad_y = torch.randn(view.shape)
    y, grad = run(view, grad_y)
    dense = view.contiguous(memory_format=suggest_memory_format(view))
    y_dense, grad_dense = run(dense, grad_y)
    assert torch.equal(y, y_dense) and torch.equal(grad, grad_dense)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extremes(isa, dtype):
    """Infinities take the GELU's limits (gelu(+inf) = inf with gradient 1; gelu(-inf) = 0 with
    gradient 0), NaN stays NaN, and large, tiny and subnormal inputs match the float64 GELU."""
    info = torch.finfo(dtype)
    tiny = [info.tiny, -info.tiny, info.tiny * info.eps, 0.0]  # the smallest normal, a subnormal, zero
    finite = [info.max, -info.max, 1e4, -1e4, 40.0, -40.0, -9.0, *tiny]
    special = [float("inf"), float("-inf"), float("nan")]
    x = torch.tensor(finite + special, dtype=dtype)
    grad_y = torch.ones_like(x)
    with backend.use_cpu_isa(isa):
        y, grad = run(x, grad_y)
    n = len(finite)
    y_exact, grad_exact = exact(x[:n], grad_y[:n])
    assert_close(y[:n], y_exact, dtype, "gelu of finite inputs")
    assert_close(grad[:n], grad_exact, dtype, "gradient at finite inputs")
    assert y[n].item() == float("inf") and grad[n].item() == 1.0
    assert y[n + 1].item() == 0.0 and grad[n + 1].item() == 0.0
    assert torch.isnan(y[n + 2]) and torch.isnan(grad[n + 2])


def test_the_derivative_is_written_only_where_a_gradient_is_needed():
    x, _ = inputs((4, 300), torch.float32)
    y_with, d = torch.ops.fasthvae.gelu(x, True)
    y_without, none = torch.ops.fasthvae.gelu(x, False)
    assert none.numel() == 0 and d.shape == x.shape and torch.equal(y_with, y_without)
    with torch.no_grad():
        assert torch.equal(ops.gelu(x.requires_grad_()), y_with)
    y, _ = torch.ops.fasthvae.gelu(x, False)  # called directly without its derivative: no backward
    with pytest.raises(RuntimeError, match="derivative=False"):
        y.sum().backward()


@pytest.mark.parametrize("derivative", [True, False], ids=["derivative", "no_derivative"])
def test_gelu_passes_opcheck(derivative):
    """torch.library.opcheck: the schema, the fake kernel against the real one (channels_last and
    a slice that is copied), the autograd registration and AOTAutograd's tracing of the op."""
    x, _ = inputs((2, 6, 5, 4), torch.float32)
    for t in (x.contiguous(memory_format=CL), x[:, ::2]):
        torch.library.opcheck(torch.ops.fasthvae.gelu.default, (t.requires_grad_(derivative), derivative))


def test_compiled_backward_is_one_multiply():
    """Traced by AOTAutograd, the GELU is the op in the forward graph and a multiply by its saved
    derivative in the backward one: no error function, exponential or gelu_backward left there."""
    graphs = {}

    def keep(name):
        def compiler(gm, _):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    def f(x):
        return ops.gelu(x * 2.0) + 1.0

    x, grad_y = inputs((3, 40), torch.float32)
    x.requires_grad_()
    keeping = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    compiled = torch.compile(f, backend=keeping, fullgraph=True)
    y = compiled(x)
    (grad,) = torch.autograd.grad(y, x, grad_y)
    y_eager = f(x)
    (grad_eager,) = torch.autograd.grad(y_eager, x, grad_y)
    assert torch.equal(y, y_eager) and torch.equal(grad, grad_eager)
    forward_ops = {str(n.target) for n in graphs["fw"].graph.nodes if n.op == "call_function"}
    backward_ops = {str(n.target) for n in graphs["bw"].graph.nodes if n.op == "call_function"}
    assert "fasthvae.gelu.default" in forward_ops
    assert not {op for op in backward_ops if any(k in op for k in ("erf", "exp", "gelu"))}, backward_ops


def test_the_reference_backend_and_float64_run_f_gelu():
    x, _ = inputs((5, 7), torch.float32)
    with backend.use_backend("reference"):
        assert not activation.fused_gelu_runs(x) and torch.equal(ops.gelu(x), F.gelu(x))
    x64 = x.double()
    assert not activation.fused_gelu_runs(x64) and torch.equal(ops.gelu(x64), F.gelu(x64))


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16, got Int"):
        torch.ops.fasthvae.gelu(torch.ones(3, dtype=torch.int32), True)


def test_conv_input_gelu_keeps_the_dtype_under_autocast():
    """Fused or not, under CPU autocast the GELU of a float32 input is float32 (autocast leaves the
    GELU alone; the convolution that reads it casts), and the fused one is ``ops.gelu``."""
    x, _ = inputs((2, 8, 4, 4), torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        fused, plain = conv_input_gelu(x, fused=True), conv_input_gelu(x, fused=False)
    assert fused.dtype == plain.dtype == torch.float32
    assert torch.equal(fused, ops.gelu(x)) and torch.equal(plain, F.gelu(x))


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="x86-64 with binutils' objdump"
)
def test_each_isa_loop_calls_its_vector_exponential():
    """Every AVX-512 and AVX2 wrapper of the GELU's loop calls glibc's vector expf of its width
    (``_ZGVeN16v_expf``, ``_ZGVdN8v_expf``): the loop vectorized. Without ``-fno-trapping-math`` GCC
    left the AVX2 ones scalar (a select kept as a branch), ten times slower and correct, so no value
    test sees it."""
    library = backend.extension().__file__
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True, check=True
    ).stdout
    calls: dict[str, set[str]] = {}
    for function in re.split(r"\n(?=[0-9a-f]+ <)", listing):
        header = re.match(r"[0-9a-f]+ <.*?gelu_span_(avx512|avx2)<([^,]+), ([^,]+), (true|false)>", function)
        if header:
            calls.setdefault("/".join(header.groups()), set()).update(
                re.findall(r"call.*<(\w+)@plt>", function)
            )
    # 2 levels x 5 (input, output) dtypes (each to itself, float32 and float16 to bfloat16) x with and
    # without the derivative
    assert len(calls) == 20, sorted(calls)
    want = {"avx512": "_ZGVeN16v_expf", "avx2": "_ZGVdN8v_expf"}
    assert all(want[name.split("/")[0]] in called for name, called in calls.items()), calls


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_the_bfloat16_output_variant_rounds_the_same_gelu(isa, dtype, layout):
    """fasthvae::gelu_bfloat16 (the fused convolution's GELU): gelu(x) written in bfloat16 is the
    bfloat16 rounding of fasthvae::gelu's float32 result (of x in float32, which holds every value of
    x's dtype), bit for bit, and its derivative is gelu's, in x's dtype and layout."""
    x, _ = inputs((3, 5, 33, 7), dtype)
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    with backend.use_cpu_isa(isa):
        y, d = torch.ops.fasthvae.gelu_bfloat16(x, True)
        y_float, _ = torch.ops.fasthvae.gelu(x.float(), False)
        _, d_same = torch.ops.fasthvae.gelu(x, True)
    assert y.dtype == torch.bfloat16 and d.dtype == dtype and y.stride() == d.stride() == x.stride()
    assert torch.equal(y, y_float.bfloat16()) and torch.equal(d, d_same)
    y_alone, d_alone = torch.ops.fasthvae.gelu_bfloat16(x, False)
    assert torch.equal(y_alone, y) and d_alone.numel() == 0


def test_the_bfloat16_output_variant_passes_opcheck():
    x, _ = inputs((3, 5, 33, 7), torch.float32)
    torch.library.opcheck(torch.ops.fasthvae.gelu_bfloat16.default, (x, True))
