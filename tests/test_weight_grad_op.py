"""fasthvae::conv1x1_weight_grad, a 1x1 convolution's weight and bias gradients over its pixels,
against float64 products on every CPU ISA path: shapes on both sides of the kernel's tiles and
tasks, strided inputs, non-finite values, thread counts, errors; its wrapper on image batches and
the op's registration (opcheck)."""

import pytest
import torch
import torch.nn.functional as F

from fasthvae import ops
from fasthvae.ops import backend
from tests.helpers import assert_non_finite_confined, needs_extension, torch_threads

pytestmark = needs_extension
ISAS = tuple(backend.cpu_isas()) if backend.extension() else ()
CL = torch.channels_last
# Float32 sums of up to a few thousand products of N(0, 1) numbers: 2^-18 of the largest entry is
# several times the error seen (up to ~2^-20 at 32,768 pixels), far below an error of one product.
TOLERANCE = 2**-18


def op(grad_y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fasthvae.conv1x1_weight_grad(grad_y, x)


def exact(grad_y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = grad_y.double()
    return g.t() @ x.double(), g.sum(0)


def pixels(rows: int, c: int, o: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, o, generator=g), torch.randn(rows, c, generator=g)


def assert_near(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch.float32 and ours.shape == expected.shape and ours.is_contiguous(), what
    error = (ours.double() - expected).abs().max().item()
    assert error <= TOLERANCE * expected.abs().max().item(), f"{what}: error {error}"


# (pixels, in channels C, out channels O): lanes of 16 (both orders), an odd multiple of 8 (the last
# chunk 8 lanes), one side not a multiple of 8 (the head's 64 -> 100; 3 -> 40), neither (the ATen
# products), uneven tiles (13, 100 broadcast columns); one pixel, one task exactly, one more, tasks
# with a remainder.
SHAPES = [
    (1, 16, 64),
    (31, 64, 16),
    (1024, 16, 64),
    (1025, 64, 16),
    (5000, 24, 13),
    (3000, 64, 100),
    (2100, 3, 40),
    (700, 5, 3),
    (4100, 96, 32),
    (2048, 8, 8),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_against_float64(isa, shape):
    rows, c, o = shape
    grad_y, x = pixels(rows, c, o)
    with backend.use_cpu_isa(isa):
        grad_w, grad_b = op(grad_y, x)
    expected_w, expected_b = exact(grad_y, x)
    assert_near(grad_w, expected_w, "grad_w")
    assert_near(grad_b, expected_b, "grad_b")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [9000, 1500], ids=["nine_tasks", "two_tasks_split_by_lanes"])
def test_the_same_bits_on_any_thread_count(isa, rows):
    """Tasks of a fixed number of pixels, added in task order: one thread and five give equal bits,
    and a second call the same again; with two tasks, five threads split them by lane chunks too."""
    grad_y, x = pixels(rows, 64, 100)
    results = []
    for n in (1, 5, 5):
        with backend.use_cpu_isa(isa), torch_threads(n):
            results.append(op(grad_y, x))
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again, strict=True))


@pytest.mark.parametrize("isa", ISAS)
def test_strided_inputs(isa):
    """Rows further apart than their width (a slice of wider pixels) are read where they lie; a
    transposed matrix (columns not adjacent) gives the same values as its contiguous copy."""
    grad_y, x = pixels(1500, 40, 24)
    wide_g, wide_x = torch.randn(1500, 30), torch.randn(1500, 50)
    wide_g[:, 3:27], wide_x[:, 5:45] = grad_y, x
    transposed_x = x.t().contiguous().t()
    with backend.use_cpu_isa(isa):
        base = op(grad_y, x)
        sliced = op(wide_g[:, 3:27], wide_x[:, 5:45])
        transposed = op(grad_y, transposed_x)
    for ours in (sliced, transposed):
        assert all(torch.equal(a, b) for a, b in zip(base, ours, strict=True))


@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_values_stay_in_their_row_and_column(isa):
    """A NaN in grad_y's channel 3 and an inf in x's channel 7 (same pixel): NaN in grad_w's row 3 and
    grad_b[3], inf or NaN in column 7; every other entry finite."""
    grad_y, x = pixels(3000, 32, 16)
    grad_y[100, 3], x[2500, 7] = float("nan"), float("inf")
    with backend.use_cpu_isa(isa):
        grad_w, grad_b = op(grad_y, x)
    assert_non_finite_confined(grad_w, grad_b, out_channel=3, in_channel=7)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_sides(isa):
    """No pixels: zeros. No input channels: an empty grad_w and grad_y's sums as grad_b. No output
    channels: both empty."""
    g = torch.randn(10, 8)
    with backend.use_cpu_isa(isa):
        no_pixels = op(torch.empty(0, 16), torch.empty(0, 8))
        no_inputs = op(g, torch.empty(10, 0))
        no_outputs = op(torch.empty(10, 0), torch.randn(10, 5))
    assert torch.equal(no_pixels[0], torch.zeros(16, 8)) and torch.equal(no_pixels[1], torch.zeros(16))
    assert no_inputs[0].shape == (8, 0)
    assert_near(no_inputs[1], g.double().sum(0), "grad_b without input channels")
    assert no_outputs[0].shape == (0, 5) and no_outputs[1].shape == (0,)


@pytest.mark.parametrize(
    "grad_y, x, message",
    [
        (torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8), "grad_y must be float32"),
        (torch.randn(4, 8), torch.randn(4, 8, 1), "x must be 2-D"),
        (torch.randn(4, 8), torch.randn(5, 8), "grad_y has 4 pixels (rows), x has 5"),
    ],
    ids=["dtype", "dims", "rows"],
)
def test_bad_inputs_are_named(grad_y, x, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        op(grad_y, x)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_the_wrapper_takes_batches_of_images(layout):
    """``fasthvae.ops.conv1x1_weight_grad`` on [N, C, H, W]: the weight's gradient [O, C, 1, 1] and
    the bias's, as a float64 1x1 convolution's autograd gives them; float64 inputs take torch's
    products (the op is float32), to float64 rounding."""
    g = torch.Generator().manual_seed(1)
    x, grad_y = torch.randn(3, 24, 9, 7, generator=g), torch.randn(3, 40, 9, 7, generator=g)
    if layout == "channels_last":
        x, grad_y = x.contiguous(memory_format=CL), grad_y.contiguous(memory_format=CL)
    x64, w64 = x.double(), torch.zeros(40, 24, 1, 1, dtype=torch.float64, requires_grad=True)
    b64 = torch.zeros(40, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(F.conv2d(x64, w64, b64), (w64, b64), grad_y.double())
    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.float64, 1e-12)):
        ours = ops.conv1x1_weight_grad(grad_y.to(dtype), x.to(dtype))
        for got, want in zip(ours, expected, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            assert (got.double() - want).abs().max() <= tolerance * want.abs().max()


@pytest.mark.parametrize(
    "grad_y_shape, x_shape",
    [((2, 8, 4, 4), (2, 8, 4, 5)), ((), (2, 8, 4, 4)), ((2, 8, 16), (2, 8, 4, 4))],
    ids=["width", "scalar", "three_dims"],
)
def test_the_wrapper_names_mismatched_batches(grad_y_shape, x_shape):
    message = f"must share N, H and W, got {grad_y_shape} and {x_shape}"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.conv1x1_weight_grad(torch.randn(grad_y_shape), torch.randn(x_shape))


def test_the_op_passes_opcheck():
    """torch.library.opcheck: the schema, the fake kernel against the real one, tracing."""
    grad_y, x = pixels(1100, 32, 16)
    torch.library.opcheck(torch.ops.fasthvae.conv1x1_weight_grad.default, (grad_y, x))
