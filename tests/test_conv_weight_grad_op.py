"""fasthvae::conv2d_weight_grad, a stride-1 convolution's weight and bias gradients over its pixels
for any kernel, padding and groups, against a float64 convolution's autograd on every CPU ISA path:
kernels, paddings and image sizes on both sides of the kernel's tiles, blocks and tasks, groups,
layouts, thread counts, non-finite values, empty sides, errors; its wrapper and the op's
registration (opcheck)."""

import pytest
import torch
import torch.nn.functional as F

from fasthvae import ops
from fasthvae.ops import backend
from tests.helpers import assert_non_finite_confined, needs_extension, torch_threads

pytestmark = needs_extension
ISAS = tuple(backend.cpu_isas()) if backend.extension() else ()
KERNEL_ISAS = tuple(isa for isa in ISAS if isa != "baseline")  # where the AVX2 kernel runs
CL = torch.channels_last
# Float32 sums of up to a few thousand products of N(0, 1) numbers per tap: 2^-18 of the largest
# entry is several times the error seen, far below an error of one product.
TOLERANCE = 2**-18


def op(
    grad_y: torch.Tensor, x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int], groups: int = 1
):
    return torch.ops.fasthvae.conv2d_weight_grad(grad_y, x, list(kernel), list(padding), groups)


def batch(n: int, c: int, h: int, w: int, o: int, kernel, padding, seed: int = 0):
    """x [n, c, h, w] and the gradient of the convolution's output, both channels_last."""
    g = torch.Generator().manual_seed(seed)
    ho, wo = h + 2 * padding[0] - kernel[0] + 1, w + 2 * padding[1] - kernel[1] + 1
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    grad_y = torch.randn(n, o, ho, wo, generator=g).contiguous(memory_format=CL)
    return grad_y, x


def exact(
    grad_y: torch.Tensor, x: torch.Tensor, kernel, padding, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 convolution's weight and bias gradients."""
    w = torch.zeros(grad_y.shape[1], x.shape[1] // groups, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(grad_y.shape[1], dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x.double(), w, b, padding=padding, groups=groups)
    return torch.autograd.grad(y, (w, b), grad_y.double())


def assert_near(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert ours.dtype == torch.float32 and ours.shape == expected.shape, what
    error = (ours.double() - expected).abs().max().item()
    assert error <= TOLERANCE * expected.abs().max().item(), f"{what}: error {error}"


# (N, C, H, W, O, kernel, padding): the deep model's 3x3 shapes (16 and 32 channels; images of 32,
# 8, 4 and 1 pixels a side), odd sides and lanes of 8 (24), a 3x5 kernel, no padding, padding wider
# than the kernel's half (outputs larger than inputs), the first convolution's 3 -> 64 (the output
# channels as lanes), neither channel count a multiple of 8 (ATen's products), ten tasks, blocks
# that split image rows (40 wide), 1x1 kernels with and without padding.
SHAPES = [
    (2, 16, 32, 32, 16, (3, 3), (1, 1)),
    (3, 16, 8, 8, 32, (3, 3), (1, 1)),
    (5, 32, 4, 4, 16, (3, 3), (1, 1)),
    (4, 16, 1, 1, 16, (3, 3), (1, 1)),
    (2, 8, 7, 5, 24, (3, 3), (1, 1)),
    (2, 16, 9, 11, 16, (3, 5), (1, 2)),
    (2, 16, 10, 10, 16, (3, 3), (0, 0)),
    (2, 16, 6, 6, 16, (5, 5), (3, 3)),
    (2, 3, 12, 12, 64, (3, 3), (1, 1)),
    (2, 5, 6, 6, 3, (3, 3), (1, 1)),
    (40, 16, 16, 16, 16, (3, 3), (1, 1)),
    (1, 16, 33, 40, 16, (3, 3), (1, 1)),
    (2, 64, 9, 7, 16, (1, 1), (0, 0)),
    (2, 16, 5, 5, 16, (1, 1), (1, 1)),
]


def shape_id(shape) -> str:
    n, c, h, w, o, kernel, padding = shape
    return f"{n}x{c}x{h}x{w}-{o}_k{kernel[0]}x{kernel[1]}_p{padding[0]}x{padding[1]}"


# (N, C, H, W, O, kernel, padding, groups): the deep model's grouped 3x3 (2 groups of 16 channels)
# at 32x32 and 8x8, 4 groups of 8 input and 16 output channels on odd sides, a grouped 1x1 (the
# pixel matrices' column slices), groups of 4 channels (ATen's grouped products) and depthwise.
GROUPED = [
    (2, 32, 32, 32, 32, (3, 3), (1, 1), 2),
    (3, 32, 8, 8, 32, (3, 3), (1, 1), 2),
    (2, 32, 7, 9, 64, (3, 3), (1, 1), 4),
    (2, 32, 5, 5, 16, (1, 1), (0, 0), 2),
    (2, 12, 6, 6, 12, (3, 3), (1, 1), 3),
    (2, 16, 6, 6, 16, (3, 3), (1, 1), 16),
]


def grouped_id(shape) -> str:
    return shape_id(shape[:-1]) + (f"_g{shape[-1]}" if shape[-1] > 1 else "")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(*shape, 1) for shape in SHAPES] + GROUPED, ids=grouped_id)
def test_values_against_float64(isa, shape):
    *sizes, kernel, padding, groups = shape
    grad_y, x = batch(*sizes, kernel, padding)
    with backend.use_cpu_isa(isa):
        grad_w, grad_b = op(grad_y, x, kernel, padding, groups)
    expected_w, expected_b = exact(grad_y, x, kernel, padding, groups)
    assert grad_w.is_contiguous(memory_format=CL)
    assert_near(grad_w, expected_w, "grad_w")
    assert_near(grad_b, expected_b, "grad_b")


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("kernel, padding", [((3, 3), (1, 1)), ((1, 1), (0, 0))], ids=["3x3", "1x1"])
def test_a_group_is_its_channels_ungrouped(isa, kernel, padding):
    """Each group's gradient has the bits of the ungrouped op on that group's channels (copied out)."""
    grad_y, x = batch(2, 32, 9, 9, 48, kernel, padding)
    with backend.use_cpu_isa(isa):
        grad_w, grad_b = op(grad_y, x, kernel, padding, 2)
        halves = [
            op(grad_y[:, 24 * i : 24 * (i + 1)].clone(), x[:, 16 * i : 16 * (i + 1)].clone(), kernel, padding)
            for i in (0, 1)
        ]
    assert torch.equal(grad_w, torch.cat([w for w, _ in halves]))
    assert torch.equal(grad_b, torch.cat([b for _, b in halves]))


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("n", [9, 1], ids=["nine_tasks", "one_task_split_by_taps"])
def test_the_same_bits_on_any_thread_count(isa, n):
    """Tasks of a fixed number of output pixels, added in task order: one thread and five give equal
    bits, and a second call the same again; one task is split by taps and lane chunks at five. (On
    baseline CPUs ATen's convolution backward runs, whose bits may change with the thread count.)"""
    grad_y, x = batch(n, 32, 16, 16, 16, (3, 3), (1, 1))
    results = []
    for threads in (1, 5, 5):
        with backend.use_cpu_isa(isa), torch_threads(threads):
            results.append(op(grad_y, x, (3, 3), (1, 1)))
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again, strict=True))


@pytest.mark.parametrize("isa", ISAS)
def test_a_1x1_kernel_is_the_matrix_ops_product(isa):
    """Unpadded 1x1: the pixels as one matrix, the same bits as conv1x1_weight_grad's."""
    grad_y, x = batch(3, 64, 9, 7, 32, (1, 1), (0, 0))
    rows = [t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in (grad_y, x)]
    with backend.use_cpu_isa(isa):
        grad_w, grad_b = op(grad_y, x, (1, 1), (0, 0))
        matrix_w, matrix_b = torch.ops.fasthvae.conv1x1_weight_grad(*rows)
    assert torch.equal(grad_w.view(32, 64), matrix_w) and torch.equal(grad_b, matrix_b)


@pytest.mark.parametrize("isa", ISAS)
def test_any_layout_is_read_as_channels_last(isa):
    """NCHW batches and a sliced x give the bits of their channels_last copies."""
    grad_y, x = batch(2, 16, 8, 8, 32, (3, 3), (1, 1))
    wide = torch.randn(2, 40, 8, 8).contiguous(memory_format=CL)
    wide[:, 8:24] = x
    with backend.use_cpu_isa(isa):
        base = op(grad_y, x, (3, 3), (1, 1))
        nchw = op(grad_y.contiguous(), x.contiguous(), (3, 3), (1, 1))
        sliced = op(grad_y, wide[:, 8:24], (3, 3), (1, 1))
    for ours in (nchw, sliced):
        assert all(torch.equal(a, b) for a, b in zip(base, ours, strict=True))


@pytest.mark.parametrize("isa", ISAS)
def test_non_finite_values_stay_in_their_row_and_column(isa):
    """A NaN in grad_y's channel 3 and an inf in x's channel 7, both inside the image: NaN in every
    tap of grad_w's row 3 and in grad_b[3], inf or NaN in every tap of column 7; the rest finite."""
    grad_y, x = batch(2, 16, 8, 8, 16, (3, 3), (1, 1))
    grad_y[0, 3, 4, 4], x[1, 7, 3, 5] = float("nan"), float("inf")
    with backend.use_cpu_isa(isa):
        grad_w, grad_b = op(grad_y, x, (3, 3), (1, 1))
    assert_non_finite_confined(grad_w, grad_b, out_channel=3, in_channel=7)


@pytest.mark.parametrize("isa", ISAS)
def test_empty_sides(isa):
    """No images: zeros. No input channels: an empty grad_w and grad_y's sums as grad_b. No output
    channels: both empty."""
    grad_y = torch.randn(2, 8, 5, 5)
    with backend.use_cpu_isa(isa):
        no_images = op(torch.empty(0, 16, 5, 5), torch.empty(0, 8, 5, 5), (3, 3), (1, 1))
        no_inputs = op(grad_y, torch.empty(2, 0, 5, 5), (3, 3), (1, 1))
        no_outputs = op(torch.empty(2, 0, 5, 5), torch.randn(2, 5, 5, 5), (3, 3), (1, 1))
    assert torch.equal(no_images[0], torch.zeros(16, 8, 3, 3)) and torch.equal(no_images[1], torch.zeros(16))
    assert no_inputs[0].shape == (8, 0, 3, 3)
    assert_near(no_inputs[1], grad_y.double().sum((0, 2, 3)), "grad_b without input channels")
    assert no_outputs[0].shape == (0, 5, 3, 3) and no_outputs[1].shape == (0,)


IMAGES = (1, 8, 4, 4)


@pytest.mark.parametrize(
    "grad_y_shape, x_shape, kernel, padding, groups, message",
    [
        (IMAGES, IMAGES, (3, 3), (1, 1), 1, "grad_y must be float32"),
        (IMAGES, (8, 4, 4), (3, 3), (1, 1), 1, "x must be 4-D"),
        (IMAGES, IMAGES, (3, 3), (0, 0), 1, "maps x [1, 8, 4, 4] to outputs [1, O, 2, 2]"),
        (IMAGES, IMAGES, (0, 3), (1, 1), 1, "kernel_size must be two positive ints"),
        (IMAGES, IMAGES, (3, 3), (-1, 1), 1, "padding must be two non-negative"),
        (
            (1, 6, 4, 4),
            IMAGES,
            (3, 3),
            (1, 1),
            4,
            "groups must divide x's 8 channels and grad_y's 6, got groups=4",
        ),
        (IMAGES, IMAGES, (3, 3), (1, 1), 0, "groups must divide x's 8 channels and grad_y's 8, got groups=0"),
    ],
    ids=["dtype", "dims", "output_size", "kernel", "padding", "groups", "zero_groups"],
)
def test_bad_inputs_are_named(grad_y_shape, x_shape, kernel, padding, groups, message):
    dtype = torch.float64 if message.startswith("grad_y must be") else torch.float32
    grad_y, x = torch.randn(grad_y_shape, dtype=dtype), torch.randn(x_shape)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        op(grad_y, x, kernel, padding, groups)


@pytest.mark.parametrize("groups", [1, 4])
def test_the_wrapper_takes_ints_and_other_dtypes(groups):
    """``fasthvae.ops.conv2d_weight_grad`` with int kernel and padding, ungrouped and grouped;
    float64 batches take ATen's convolution backward (the op is float32), to float64 rounding."""
    grad_y, x = batch(3, 24, 9, 7, 40, (3, 3), (1, 1), seed=1)
    expected = exact(grad_y, x, (3, 3), (1, 1), groups)
    for dtype, tolerance in ((torch.float32, TOLERANCE), (torch.float64, 1e-12)):
        ours = ops.conv2d_weight_grad(grad_y.to(dtype), x.to(dtype), 3, padding=1, groups=groups)
        for got, want in zip(ours, expected, strict=True):
            assert got.dtype == dtype and got.shape == want.shape
            assert (got.double() - want).abs().max() <= tolerance * want.abs().max()


@pytest.mark.parametrize(
    "grad_y_shape, x_shape, kernel, padding, groups, message",
    [
        ((2, 8, 4, 4), (2, 8, 4, 4), 3, 0, 1, r"maps x \(2, 8, 4, 4\) to \[2, O, 2, 2\]"),
        ((2, 8, 16), (2, 8, 4, 4), 3, 1, 1, "must be 4-D"),
        ((2, 8, 4, 4), (2, 8, 4, 4), (3, 3, 3), 1, 1, "kernel_size must be an int or two ints"),
        ((2, 8, 4, 4), (2, 8, 4, 4), 3, -1, 1, "padding .* non-negative"),
        (
            (2, 6, 4, 4),
            (2, 8, 4, 4),
            3,
            1,
            4,
            "groups must be a positive int dividing x's 8 channels and grad_y's 6",
        ),
    ],
    ids=["output_size", "three_dims", "kernel", "padding", "groups"],
)
def test_the_wrapper_names_bad_arguments(grad_y_shape, x_shape, kernel, padding, groups, message):
    with pytest.raises(ValueError, match=message):
        ops.conv2d_weight_grad(torch.randn(grad_y_shape), torch.randn(x_shape), kernel, padding, groups)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_op_passes_opcheck(groups):
    """torch.library.opcheck: the schema, the fake kernel (channels_last strides) against the real
    one, tracing."""
    grad_y, x = batch(2, 16, 6, 6, 32, (3, 3), (1, 1))
    torch.library.opcheck(torch.ops.fasthvae.conv2d_weight_grad.default, (grad_y, x, [3, 3], [1, 1], groups))
