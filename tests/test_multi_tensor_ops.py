"""The multi-tensor bookkeeping ops (``ops.multi_tensor_norms``, ``multi_tensor_scale_``,
``multi_tensor_ema_``): the CPU loops against a float64 ground truth (norms) and bit for bit
against torch's foreach ops (scaling, EMA), every dtype, odd and empty shapes, channels_last,
extremes (the scaling on every ISA path); the fallbacks, the errors, autograd's version counters
and torch.compile."""

import pytest
import torch

from fasthvae import ops
from fasthvae.ops import backend, multi_tensor, reference
from tests.helpers import DTYPES, needs_extension, torch_threads

pytestmark = needs_extension
ALL_DTYPES = (*DTYPES, torch.float64)
# one channels_last, one of three blocks of the loops (the last partial), odd, empty and 0-dim ones
SHAPES = [(64, 16, 3, 3), (2, 35_001), (7,), (5, 3), (1, 1, 1, 1), (0,), (3, 1, 2, 9), ()]


def tensor_list(dtype, seed=0, scale=1.0):
    """Tensors of SHAPES, values in the dtype's range."""
    g = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(s, generator=g) * scale).to(dtype) for s in SHAPES]
    tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    return tensors


def clones(tensors):
    return [t.clone(memory_format=torch.preserve_format) for t in tensors]


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.stride() == e.stride()
        assert torch.equal(a, e) or (
            (a.isnan() == e.isnan()).all() and torch.equal(a.nan_to_num(), e.nan_to_num())
        )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_norms_against_float64(dtype):
    tensors = tensor_list(dtype)
    norms = ops.multi_tensor_norms(tensors)
    want = torch.stack([t.double().norm() for t in tensors])
    assert norms.dtype == torch.float32 and norms.shape == (len(tensors),)
    # squares summed in float64: only the final rounding to float32 (half an ulp)
    torch.testing.assert_close(norms.double(), want, rtol=2**-24, atol=0)


def test_norms_of_extremes():
    """Squares that overflow float32 still give the finite norm; inf and NaN propagate."""
    big = torch.full((3, 5), 1e30)
    norms = ops.multi_tensor_norms(
        [big, torch.tensor([1.0, float("inf")]), torch.tensor([float("nan"), 1.0])]
    )
    assert norms[0].item() == pytest.approx(1e30 * 15**0.5, rel=2**-23)
    assert norms[1].item() == float("inf") and norms[2].isnan()
    assert reference.multi_tensor_norms([big])[0].isinf()  # torch's float32 sum of squares overflows


@pytest.mark.parametrize("isa", backend.cpu_isas() if backend.extension() else ())
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("factor", [0.3, 1.0, 1e-30, float("inf"), float("nan")], ids=str)
def test_scale_equals_torch_foreach(dtype, factor, isa):
    """On every ISA path of the scaling loop the machine has."""
    tensors = tensor_list(dtype)
    want = clones(tensors)
    reference.multi_tensor_scale_(want, torch.tensor(factor))
    with backend.use_cpu_isa(isa):
        ops.multi_tensor_scale_(tensors, torch.tensor(factor))
    assert_same(tensors, want)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("weight", [1e-3, 0.5, 1.0, 0.0], ids=str)
def test_ema_equals_torch_foreach(dtype, weight):
    averages, values = tensor_list(dtype, seed=1), tensor_list(dtype, seed=2, scale=3.0)
    want = clones(averages)
    reference.multi_tensor_ema_(want, values, torch.tensor(weight))
    ops.multi_tensor_ema_(averages, values, torch.tensor(weight))
    assert_same(averages, want)


def test_the_loops_run_and_give_the_same_bits_on_any_thread_count(loops_taken):
    results = []
    for n in (1, 5):
        grads, averages = tensor_list(torch.float32), tensor_list(torch.float32, seed=1)
        with torch_threads(n):
            norms = ops.multi_tensor_norms(grads)
            ops.multi_tensor_scale_(grads, torch.tensor(0.7))
            ops.multi_tensor_ema_(averages, grads, torch.tensor(0.1))
        results.append([norms, *grads, *averages])
    assert loops_taken == [True] * 6
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize(
    "make_values",
    [
        lambda avg: [torch.randn(a.shape[0], 2 * a.shape[1], *a.shape[2:])[:, ::2] for a in avg],
        lambda avg: [a.contiguous() + 1 for a in avg],  # channels_last average, contiguous value
    ],
    ids=["strided", "other-layout"],
)
def test_lists_the_loops_do_not_take_go_to_torch(loops_taken, make_values):
    averages = [torch.randn(4, 6, 3, 3).contiguous(memory_format=torch.channels_last), torch.randn(2, 4, 5)]
    values = make_values(averages)
    want = clones(averages)
    reference.multi_tensor_ema_(want, values, torch.tensor(0.25))
    ops.multi_tensor_ema_(averages, values, torch.tensor(0.25))
    assert_same(averages, want)
    assert loops_taken == [False]


def test_strided_tensors_norms_go_to_torch(loops_taken):
    values = [torch.randn(4, 12, 3, 3)[:, ::2], torch.randn(5)]
    assert torch.equal(ops.multi_tensor_norms(values), reference.multi_tensor_norms(values))
    assert loops_taken == [False]


def test_the_reference_backend_uses_torch(loops_taken):
    with ops.use_backend("reference"):
        assert ops.multi_tensor_norms([torch.ones(4)]).tolist() == [2.0]
    assert loops_taken == [False]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="2 averages but 1 values"):
        ops.multi_tensor_ema_([torch.ones(2), torch.ones(2)], [torch.ones(2)], torch.tensor(0.5))
    with pytest.raises(ValueError, match="factor must be a one-element tensor"):
        ops.multi_tensor_scale_([torch.ones(2)], torch.ones(2))
    ext = backend.extension()
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be dense"):
        ext.multi_tensor_norms([torch.ones(2), torch.ones(4)[::2]])
    with pytest.raises(RuntimeError, match=r"averages\[0\] and values\[0\] differ"):
        ext.multi_tensor_ema_([torch.ones(2, 3)], [torch.ones(3, 2)], torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="weight must be one float32 element"):
        ext.multi_tensor_ema_([torch.ones(2)], [torch.ones(2)], torch.tensor(0.5, dtype=torch.float64))


def test_in_place_loops_mark_their_tensors_modified():
    """Autograd refuses a tensor scaled after it was saved for backward, as after any in-place op."""
    leaf = torch.randn(5, requires_grad=True)
    saved = torch.randn(5)
    out = (leaf * saved).sum()  # saves `saved`
    before = saved._version
    ops.multi_tensor_scale_([saved], torch.tensor(0.5))
    assert saved._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_opcheck_and_compile_fullgraph():
    tensors = tensor_list(torch.float32)[:4]
    torch.library.opcheck(multi_tensor._norms, (tensors,))
    torch.library.opcheck(multi_tensor._scale, (clones(tensors), torch.tensor(0.5)))
    torch.library.opcheck(multi_tensor._ema, (clones(tensors), tensors, torch.tensor(0.5)))

    def bookkeeping(grads, averages):
        norms = ops.multi_tensor_norms(grads)
        ops.multi_tensor_scale_(grads, torch.clamp(1.0 / norms.norm(), max=1.0))
        ops.multi_tensor_ema_(averages, grads, torch.tensor(0.1))
        return norms

    eager, compiled = (clones(tensors), clones(tensors)), (clones(tensors), clones(tensors))
    want = bookkeeping(*eager)
    got = torch.compile(bookkeeping, fullgraph=True, backend="aot_eager")(*compiled)
    assert torch.equal(got, want)
    assert all(
        torch.equal(a, b) for a, b in zip([*compiled[0], *compiled[1]], [*eager[0], *eager[1]], strict=True)
    )


def test_strides_of_size_one_dims_do_not_count(loops_taken):
    """A [1, C, 1, 1] parameter in channels_last and its gradient in the plain layout lie alike."""
    average = torch.empty_strided((1, 64, 1, 1), (64, 1, 64, 64)).copy_(torch.randn(1, 64, 1, 1))
    value = torch.randn(1, 64, 1, 1)  # strides (64, 1, 1, 1)
    assert average.stride() != value.stride()
    want = average.clone()
    reference.multi_tensor_ema_([want], [value], torch.tensor(0.3))
    ops.multi_tensor_ema_([average], [value], torch.tensor(0.3))
    assert loops_taken == [True] and torch.equal(average, want)
