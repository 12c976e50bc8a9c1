"""fasthvae_onednn::conv2d (fasthvae/ops/onednn_conv.py, csrc/onednn_conv.cpp) against a float64
convolution of the same inputs: values and gradients, float32 and bfloat16, NCHW and channels_last,
odd and the deep model's shapes, groups, with and without bias; torch.compile(fullgraph=True);
autocast; the GELU fused before it (fasthvae_onednn::gelu_conv2d); the deep model with its
convolutions on oneDNN; the errors."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fasthvae import ops
from fasthvae.models import DeepHVAE
from fasthvae.models.deep import DeepSpec
from fasthvae.nn import Conv2d, use_onednn_conv
from fasthvae.ops import onednn_conv
from fasthvae.training.config import TrainConfig, TrainingError
from fasthvae.training.distributed import DistInfo
from fasthvae.training.runtime import resolve_runtime
from tests.helpers import (
    ROOT,
    needs_avx512_bf16,
    needs_extension,
    needs_onednn,
    recording_backend,
    torch_threads,
)

CL = torch.channels_last
# Of the largest reference magnitude. Float32: accumulation over at most ~600 products. Bfloat16: the
# output rounded once to bfloat16 (2^-9 of a value at most its largest), the weight gradient float32.
TOLERANCE = {torch.float32: 2**-19, torch.bfloat16: 2**-8}
# (batch, channels in, height, width, channels out, kernel, padding, groups)
SHAPES = [
    (3, 5, 7, 9, 6, 3, 1, 1),  # odd, not square
    (2, 4, 6, 5, 6, 3, 0, 2),  # grouped, no padding
    (2, 6, 5, 5, 4, 1, 1, 2),  # a 1x1 kernel with padding
    (4, 16, 1, 1, 16, 1, 0, 1),  # a 1x1 image
    (32, 16, 32, 32, 16, 3, 1, 1),  # the deep model's commonest
]


def reference(x, weight, bias, padding, groups, grad_y):
    """The convolution and its gradients in float64, from the values the op computes with (a float32
    weight under bfloat16 activations is rounded to bfloat16 first)."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().to(x.dtype).double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, b64, padding=padding, groups=groups)
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], grad_y.double())
    return y, grads


def assert_near(ours: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    scale = expected.abs().max().item()
    error = (ours.double() - expected).abs().max().item()
    assert error <= tolerance * scale, f"{what}: {error:.3g} > {tolerance:.3g} x {scale:.3g}"


def inputs(shape, dtype, channels_last, bias=True, scale=1.0, seed=0):
    n, c, h, w, o, k, _, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * scale).to(dtype)
    x = x.contiguous(memory_format=CL) if channels_last else x
    weight = torch.randn(o, c // groups, k, k, generator=g) / (c // groups * k * k) ** 0.5
    b = torch.randn(o, generator=g) if bias else None
    return x.requires_grad_(), weight.requires_grad_(), None if b is None else b.requires_grad_()


def check_against_reference(shape, dtype, channels_last, bias=True, scale=1.0):
    *_, padding, groups = shape
    x, weight, b = inputs(shape, dtype, channels_last, bias, scale)
    y = onednn_conv.conv2d(x, weight, b, padding, groups)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, expected_grads = reference(x, weight, b, padding, groups, grad_y)
    grads = torch.autograd.grad(y, [t for t in (x, weight, b) if t is not None], grad_y)
    assert y.dtype == dtype and y.shape == expected.shape
    tolerance = TOLERANCE[dtype]
    assert_near(y, expected, tolerance, "output")
    for name, ours, exp in zip(("x", "weight", "bias"), grads, expected_grads, strict=False):
        assert ours.dtype == (dtype if name == "x" else torch.float32), name
        # The weight and bias gradients come back in float32 (accumulated in float32 from the
        # bfloat16 activations): float32's tolerance with room for the longer sums.
        assert_near(ours, exp, tolerance if name == "x" else 2**-16, f"grad {name}")
    return y, grads


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_avx512_bf16)])
def test_conv2d_values_and_gradients(shape, dtype, channels_last):
    y, _ = check_against_reference(shape, dtype, channels_last)
    assert y.is_contiguous(
        memory_format=CL if onednn_conv.computes_channels_last(y, y) else torch.contiguous_format
    )


@needs_onednn
@pytest.mark.parametrize("scale", [2.0**-60, 2.0**60], ids=["tiny", "huge"])
def test_conv2d_extreme_magnitudes(scale):
    check_against_reference(SHAPES[0], torch.float32, True, scale=scale)


@needs_onednn
def test_conv2d_without_bias_and_on_non_contiguous_inputs():
    shape = SHAPES[0]
    check_against_reference(shape, torch.float32, False, bias=False)
    _, weight, b = inputs(shape, torch.float32, False)
    wide = torch.randn(3, 10, 7, 9)[:, ::2]  # a strided slice, neither layout
    kept = weight.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # a channels_last weight
    y = onednn_conv.conv2d(wide, kept, b, 1)
    assert_near(y, F.conv2d(wide.double(), kept.double(), b.double(), padding=1), 2**-19, "strided input")
    assert y.is_contiguous(memory_format=CL)  # the weight lies channels_last, as ATen decides


# 1x1 convolutions from 64 channels on small images, whose weight gradient oneDNN's AMX code runs
# faster on one thread than on two, and a 3x3 one that it runs faster on two. Batch 31: no other test
# makes these convolutions, so the first backward call of each (which chooses) is this test's.
THREAD_CHOICE_SHAPES = [
    (31, 64, 1, 1, 32, 1, 0, 1),
    (31, 64, 4, 4, 16, 1, 0, 1),
    (31, 64, 8, 8, 32, 1, 0, 1),
    (31, 16, 8, 8, 16, 3, 1, 1),
]


@needs_onednn
@pytest.mark.parametrize("shape", THREAD_CHOICE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_avx512_bf16)])
def test_weight_gradient_threads_chosen_on_the_first_call_change_no_value(shape, dtype):
    """The first backward call of a convolution times its weight gradient on one thread and on all
    (two here, whatever the machine's cores) and keeps the faster one only where both give the same
    bits: every later call returns the first call's gradients bit for bit, the values are the
    float64 convolution's, and the thread count is the caller's again after the calls."""
    *_, padding, groups = shape
    with torch_threads(2):
        x, weight, b = inputs(shape, dtype, True, seed=3)
        y = onednn_conv.conv2d(x, weight, b, padding, groups).detach()
        grad_y = (
            torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
            .to(dtype)
            .contiguous(memory_format=CL)
        )
        calls = [
            torch.ops.fasthvae_onednn.conv2d_backward(
                grad_y, x.detach(), weight.detach(), [padding] * 2, groups, True, True
            )
            for _ in range(3)
        ]
        assert torch.get_num_threads() == 2
    for later in calls[1:]:
        for name, first, again in zip(("x", "weight", "bias"), calls[0], later, strict=True):
            assert torch.equal(first, again), f"grad {name} changed after the first call"
    _, expected = reference(x, weight, b, padding, groups, grad_y)
    for name, ours, exp in zip(("x", "weight", "bias"), calls[0], expected, strict=True):
        assert_near(ours, exp, TOLERANCE[dtype] if name == "x" else 2**-16, f"grad {name}")


# Run in a process whose oneDNN is capped at AVX2 and logs every primitive it executes: the weight
# gradients of its float32 convolutions, ungrouped 1x1 ones and larger ones whose group's input or
# output channels are a multiple of 8 (3x3 ones from 3 channels to 64, grouped 3x3 ones), whatever
# the weight's layout (NCHW, channels_last, out channels adjacent) or which channel count is the
# larger, from fasthvae::conv2d_weight_grad, in the weight's strides, against float64; 3x3
# convolutions whose groups have neither (3 to 5 channels; 3 groups of 4) and a grouped 1x1 one still
# oneDNN's primitive.
AVX2_WEIGHT_GRADIENT_CHILD = """
import torch, torch.nn.functional as F
from torch.profiler import profile
from fasthvae.ops import onednn_conv
onednn_conv.load()
CL = torch.channels_last
SHAPES = (  # in and out channels, side, kernel, groups, the weight's layout
    (16, 64, 8, 1, 1, "nchw"), (64, 16, 8, 1, 1, "cl"), (16, 32, 4, 1, 1, "out_inner"),
    (5, 3, 1, 1, 1, "nchw"), (16, 16, 8, 3, 1, "nchw"), (32, 16, 8, 3, 1, "cl"),
    (16, 32, 4, 3, 1, "out_inner"), (3, 64, 8, 3, 1, "cl"), (32, 32, 8, 3, 2, "nchw"),
    (32, 64, 4, 3, 4, "cl"), (3, 5, 8, 3, 1, "cl"), (12, 12, 8, 3, 3, "nchw"), (32, 32, 2, 1, 2, "nchw"),
)
for c, o, hw, k, groups, weight_layout in SHAPES:
    g = torch.Generator().manual_seed(c + o)
    x = torch.randn(4, c, hw, hw, generator=g).contiguous(memory_format=CL)
    w = torch.randn(o, c // groups, k, k, generator=g) / c**0.5
    if weight_layout == "cl":
        w = w.contiguous(memory_format=CL)
    elif weight_layout == "out_inner":  # out channels adjacent: not an [O, C] matrix of rows
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
    grad_y = torch.randn(4, o, hw, hw, generator=g).contiguous(memory_format=CL)
    with profile() as prof:
        _, grad_w, grad_b = torch.ops.fasthvae_onednn.conv2d_backward(
            grad_y, x, w, [k // 2] * 2, groups, True, False
        )
    kernel = any(e.name == "fasthvae::conv2d_weight_grad" for e in prof.events())
    x64, w64 = x.double(), w.double().requires_grad_()
    expected_w, = torch.autograd.grad(F.conv2d(x64, w64, padding=k // 2, groups=groups), w64, grad_y.double())
    expected_b = grad_y.double().sum((0, 2, 3))
    assert grad_w.stride() == w.stride() and grad_b.dtype == torch.float32
    for name, ours, exp in (("weight", grad_w, expected_w), ("bias", grad_b, expected_b)):
        error = (ours.double() - exp).abs().max().item()
        assert error <= 2**-16 * exp.abs().max().item(), (c, o, hw, name, error)
    shape = f"{f'g{groups}' if groups > 1 else ''}mb4_ic{c}oc{o}_ih{hw}oh{hw}kh{k}"  # as oneDNN's log has it
    print("checked", shape, "fasthvae" if kernel else "elsewhere", flush=True)
"""


@needs_onednn
def test_weight_gradients_under_avx2_are_fasthvaes_kernel():
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ONEDNN_VERBOSE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", AVX2_WEIGHT_GRADIENT_CHILD]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    weight_primitives = [line for line in lines if ",exec," in line and ",backward_weights," in line]
    ours = (
        "mb4_ic16oc64_ih8oh8kh1",
        "mb4_ic64oc16_ih8oh8kh1",
        "mb4_ic16oc32_ih4oh4kh1",
        "mb4_ic5oc3_ih1oh1kh1",
        "mb4_ic16oc16_ih8oh8kh3",
        "mb4_ic32oc16_ih8oh8kh3",
        "mb4_ic16oc32_ih4oh4kh3",
        "mb4_ic3oc64_ih8oh8kh3",
        "g2mb4_ic32oc32_ih8oh8kh3",
        "g4mb4_ic32oc64_ih4oh4kh3",
    )
    for shape in ours:
        assert f"checked {shape} fasthvae" in lines
        ran = [line for line in weight_primitives if shape in line]
        assert not ran, f"{shape}: oneDNN ran its weight gradient: {ran}"
    # neither side of a group in lanes of 8; a grouped 1x1 kernel
    for shape in ("mb4_ic3oc5_ih8oh8kh3", "g3mb4_ic12oc12_ih8oh8kh3", "g2mb4_ic32oc32_ih2oh2kh1"):
        assert f"checked {shape} elsewhere" in lines
        assert any(shape in line for line in weight_primitives), f"{shape}: no oneDNN weight gradient logged"


@needs_onednn
def test_conv2d_compiles_as_one_graph_with_the_same_values():
    onednn_conv.load()  # before torch.compile traces it (compiling the extension is not traceable)
    x, weight, b = inputs(SHAPES[0], torch.float32, True)

    def f(x, weight, b):
        return onednn_conv.conv2d(x, weight, b, 1)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    y, expected = compiled(x, weight, b), f(x, weight, b)
    assert torch.equal(y, expected) and y.stride() == expected.stride()
    grad_y = torch.randn_like(expected)
    grads = torch.autograd.grad(y, (x, weight, b), grad_y)
    for ours, exp in zip(grads, torch.autograd.grad(expected, (x, weight, b), grad_y), strict=True):
        assert torch.equal(ours, exp)
    # An input without a gradient (as the model's first convolution has): the backward skips it.
    frozen = x.detach()
    grads = torch.autograd.grad(compiled(frozen, weight, b), (weight, b), grad_y)
    for ours, exp in zip(grads, torch.autograd.grad(f(frozen, weight, b), (weight, b), grad_y), strict=True):
        assert torch.equal(ours, exp)


@needs_onednn
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "no_input_grad"])
def test_conv2d_passes_opcheck(input_grad):
    """torch.library.opcheck: the schema, the fake kernel against the real one, the autograd kernel
    (registered in C++) and AOTAutograd's tracing of the op."""
    onednn_conv.load()
    x, weight, b = inputs(SHAPES[0], torch.float32, True)
    x = x.detach().contiguous(memory_format=CL).requires_grad_(input_grad)
    torch.library.opcheck(torch.ops.fasthvae_onednn.conv2d.default, (x, weight, b, [1, 1], 1, True))


@needs_onednn
def test_compiled_backward_gives_the_op_its_gradient_in_the_ops_layout():
    """A channels_last convolution whose output's gradient arrives NCHW (here through ``.contiguous()``;
    in the deep model, a split's backward): the traced backward lays the gradient out channels_last
    before the op (where a compiler can write it so in the kernel that makes it), not in a copy inside."""
    onednn_conv.load()
    x, weight, b = inputs(SHAPES[0], torch.float32, True)
    backend, calls = recording_backend(torch.ops.fasthvae_onednn.conv2d_backward.default)

    def f(x, weight, b):
        return onednn_conv.conv2d(x, weight, b, 1).contiguous()

    y = torch.compile(f, backend=backend, fullgraph=True)(x, weight, b)
    assert y.is_contiguous()
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, weight, b), grad_y)
    layouts = [(args[0].is_contiguous(memory_format=CL), args[0].is_contiguous()) for _, args in calls]
    assert layouts == [(True, False)]
    for ours, exp in zip(grads, torch.autograd.grad(f(x, weight, b), (x, weight, b), grad_y), strict=True):
        assert torch.equal(ours, exp)


@needs_onednn
@needs_avx512_bf16
def test_conv2d_under_autocast_casts_the_activations_and_keeps_float32_parameters():
    x, weight, b = inputs(SHAPES[0], torch.float32, True)
    with torch.autocast("cpu", torch.bfloat16):
        y = onednn_conv.conv2d(x, weight, b, 1)
    plain = onednn_conv.conv2d(x.detach().bfloat16(), weight, b, 1)
    assert y.dtype == torch.bfloat16 and torch.equal(y, plain)
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == b.grad.dtype == torch.float32


def gelu_then_conv(fused: bool, x, weight, b, padding, groups, grad_y):
    """conv2d(gelu(x)) as one fused op or as fasthvae.ops.gelu then the oneDNN convolution: the
    output and the gradients of x, the weight and the bias."""
    x = x.detach().requires_grad_()
    if fused:
        y = onednn_conv.gelu_conv2d(x, weight, b, padding, groups)
    else:
        y = onednn_conv.conv2d(ops.gelu(x), weight, b, padding, groups)
    return y, torch.autograd.grad(y, (x, weight, b), grad_y.to(y.dtype))


@needs_onednn
@needs_extension
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "dtype,autocast",
    [
        (torch.float32, False),
        pytest.param(torch.bfloat16, False, marks=needs_avx512_bf16),
        pytest.param(torch.float32, True, marks=needs_avx512_bf16),
    ],
    ids=["float32", "bfloat16", "float32_autocast"],
)
def test_gelu_conv2d_is_the_gelu_then_the_convolution(shape, dtype, autocast, channels_last):
    """The fused op gives the bits of fasthvae.ops.gelu followed by the oneDNN convolution (the same
    kernels, the GELU written in the convolution's dtype), values and every gradient; the gradient of
    x in x's dtype (float32 under autocast, where the convolution runs in bfloat16)."""
    *_, padding, groups = shape
    x, weight, b = inputs(shape, dtype, channels_last)
    out_shape = F.conv2d(x.detach().float(), weight.detach(), padding=padding, groups=groups).shape
    grad_y = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            results.append(gelu_then_conv(fused, x, weight, b, padding, groups, grad_y))
    (y, grads), (y_twice, grads_twice) = results
    assert y.dtype == (torch.bfloat16 if autocast else dtype) and y.stride() == y_twice.stride()
    assert torch.equal(y, y_twice)
    for ours, exp in zip(grads, grads_twice, strict=True):
        assert ours.dtype == exp.dtype and torch.equal(ours, exp)
    assert grads[0].dtype == dtype


@needs_onednn
@needs_extension
def test_gelu_conv2d_against_float64():
    """The fused op against the float64 GELU and convolution: float32, channels_last."""
    shape = SHAPES[0]
    *_, padding, groups = shape
    x, weight, b = inputs(shape, torch.float32, True, scale=3.0)
    y = onednn_conv.gelu_conv2d(x, weight, b, padding, groups)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (x, weight, b), grad_y)
    x64 = x.detach().double().requires_grad_()
    expected, expected_grads = reference(F.gelu(x64), weight, b, padding, groups, grad_y)
    (grad_x64,) = torch.autograd.grad(F.gelu(x64), x64, expected_grads[0])
    assert_near(y, expected, 2**-19, "output")
    for name, ours, exp in zip(("x", "weight", "bias"), grads, (grad_x64, *expected_grads[1:]), strict=True):
        assert_near(ours, exp, 2**-18, f"grad {name}")


@needs_onednn
@needs_extension
@pytest.mark.parametrize("derivative", [True, False], ids=["derivative", "no_derivative"])
def test_gelu_conv2d_passes_opcheck(derivative):
    onednn_conv.load()
    x, weight, b = inputs(SHAPES[0], torch.float32, True)
    x = x.detach().contiguous(memory_format=CL).requires_grad_(derivative)
    args = (x, weight, b, [1, 1], 1, True, False, derivative)
    torch.library.opcheck(torch.ops.fasthvae_onednn.gelu_conv2d.default, args)


@needs_onednn
@needs_extension
def test_gelu_conv2d_compiles_as_one_graph_with_the_same_values():
    onednn_conv.load()
    x, weight, b = inputs(SHAPES[0], torch.float32, True)

    def f(x, weight, b):
        return onednn_conv.gelu_conv2d(x, weight, b, 1)

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    y, expected = compiled(x, weight, b), f(x, weight, b)
    assert torch.equal(y, expected)
    grad_y = torch.randn_like(expected)
    grads = torch.autograd.grad(y, (x, weight, b), grad_y)
    for ours, exp in zip(grads, torch.autograd.grad(expected, (x, weight, b), grad_y), strict=True):
        assert torch.equal(ours, exp)


@needs_onednn
@needs_extension
def test_gelu_conv2d_without_the_derivative_refuses_the_input_gradient():
    onednn_conv.load()
    x, weight, b = inputs(SHAPES[0], torch.float32, True)
    x = x.detach().contiguous(memory_format=CL).requires_grad_()
    y, _, _ = torch.ops.fasthvae_onednn.gelu_conv2d(x, weight, b, [1, 1], 1, True, False, False)
    with pytest.raises(RuntimeError, match="derivative=False"):
        y.sum().backward()


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_deep_model_on_onednn_matches_aten(channels_last):
    """The same model and batch with its convolutions on ATen and on oneDNN: loss and gradients agree
    to float32 rounding (float32, so the two differ only in the order of their sums)."""
    torch.manual_seed(0)
    model = DeepHVAE(DeepSpec("1x1,4x1,8x2,16x1,32d1", width=16, zdim=4, encoder_blocks=1))
    fmt = CL if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = (torch.randint(0, 256, (4, 3, 32, 32)).float() / 255).contiguous(memory_format=fmt)
    weights = torch.ones(model.num_levels)
    results = []
    for on in (False, True):
        assert use_onednn_conv(model, on) > 0
        torch.manual_seed(1)
        loss = model.loss(x, weights)["loss"]
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (loss_aten, grads_aten), (loss_onednn, grads_onednn) = results
    assert abs(loss_onednn.item() - loss_aten.item()) <= 1e-5 * abs(loss_aten.item())
    for name, a, b in zip((n for n, _ in model.named_parameters()), grads_aten, grads_onednn, strict=True):
        assert_near(b, a.double(), 2**-14, name)


@needs_onednn
def test_conv2d_names_bad_input():
    x, weight, b = inputs(SHAPES[0], torch.float32, False)
    with pytest.raises(TypeError, match=r"float32 or bfloat16, not torch\.float16"):
        onednn_conv.conv2d(x.half(), weight, b, 1)
    with pytest.raises(RuntimeError, match="x has 5 channels, weight"):
        onednn_conv.conv2d(x, weight[:, :4], b, 1)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        onednn_conv.conv2d(x[:, :, :1, :1], weight, b, 0)


def test_conv2d_fallback_when_the_op_is_off():
    """fasthvae.nn.Conv2d is nn.Conv2d (same parameters and values) while ``onednn`` is off."""
    torch.manual_seed(0)
    ours, theirs = Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(4, 6, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, 5)
    assert not ours.onednn and torch.equal(ours(x), theirs(x))


def test_missing_onednn_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(onednn_conv.ONEDNN_ENV, str(tmp_path))
    reason = onednn_conv.missing()
    assert "no standalone oneDNN" in reason and "pip install onednn-cpu-gomp" in reason
    with pytest.raises(TrainingError, match="--onednn-conv: the op cannot be built: no standalone oneDNN"):
        resolve_runtime(TrainConfig(model="deep", device="cpu", onednn_conv=True), DistInfo())
    assert not resolve_runtime(TrainConfig(model="deep", device="cpu"), DistInfo()).onednn_conv


def test_each_checkout_builds_the_extension_under_its_own_name(tmp_path, monkeypatch):
    """Two checkouts sharing torch's build directory keep a build each (one name would make each
    rebuild the other's)."""
    here = onednn_conv.build_name("fasthvae_onednn_conv")
    assert here.startswith("fasthvae_onednn_conv_") and here == onednn_conv.build_name("fasthvae_onednn_conv")
    monkeypatch.setattr(onednn_conv, "SOURCE", tmp_path / "csrc" / "onednn_conv.cpp")
    assert onednn_conv.build_name("fasthvae_onednn_conv") != here


def test_missing_extension_is_named(monkeypatch):
    """Without fasthvae._C (its GELU and 1x1 weight-gradient kernels) the op names the rebuild, and
    the trainer's default leaves it off."""
    monkeypatch.setattr(onednn_conv.backend, "extension", lambda: None)
    reason = onednn_conv.missing()
    assert "fasthvae._C" in reason and "pip install --no-build-isolation -e ." in reason
    assert not resolve_runtime(TrainConfig(model="deep", device="cpu"), DistInfo()).onednn_conv


def test_onednn_conv_is_named_where_the_model_has_none():
    with pytest.raises(TrainingError, match="only the deep model's convolutions have it, not the hvae"):
        resolve_runtime(TrainConfig(model="hvae", device="cpu", onednn_conv=True), DistInfo())
