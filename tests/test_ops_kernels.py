"""Every kernel backend (CPU C++, Triton, reference kernels) against the float64 ground truth."""

import contextlib

import pytest
import torch

from fasthvae.ops import backend, library
from fasthvae.ops.philox import philox_randn
from fasthvae.ops.reference import REDUCTIONS
from tests.helpers import (
    CUDA_KERNELS,
    DTYPES,
    NOISE_ULPS,
    TRITON_DEVICE,
    assert_close,
    exact,
    needs_cuda_kernels,
    needs_gpu,
    noise_tolerance,
    torch_threads,
)

# The CPU kernels once per ISA path this CPU has ("cpu-avx2" runs the AVX2 loops on an AVX-512
# machine too), Triton (on CUDA tensors where there is a GPU, in its interpreter on CPU tensors
# elsewhere), the CUDA C++ kernels (GPU only) and the reference kernels.
CPU_KERNELS = tuple(f"cpu-{isa}" for isa in backend.cpu_isas()) if backend.extension() else ("cpu",)
KERNELS = (*CPU_KERNELS, "triton", pytest.param("cuda", marks=needs_cuda_kernels), "reference")


def device_of(kernel: str) -> str:
    """Where a kernel's inputs live (the ground truth is always computed on CPU in float64)."""
    return {"triton": TRITON_DEVICE, "cuda": "cuda"}.get(kernel, "cpu")


@contextlib.contextmanager
def kernel_in_use(kernel: str):
    """``use_backend`` for the kernel's backend; ``cpu-<isa>`` also picks the CPU ISA path."""
    name, _, isa = kernel.partition("-")
    with backend.use_backend(name), backend.use_cpu_isa(isa) if isa else contextlib.nullcontext():
        yield


SEED = 0x1234_5678_9ABC


def make_inputs(shape, dtype, prior, scale=1.0, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    mu = (torch.randn(shape, generator=g) * scale).to(dtype)
    logvar = torch.randn(shape, generator=g).to(dtype)
    if not prior:
        return mu, logvar, None, None
    return (
        mu,
        logvar,
        (torch.randn(shape, generator=g) * scale).to(dtype),
        torch.randn(shape, generator=g).to(dtype),
    )


def upstream(shape, dtype, reduction, rows):
    g = torch.Generator().manual_seed(99)
    grad_z = torch.randn(shape, generator=g).to(dtype)
    if reduction == "none":
        grad_kl = torch.randn(shape, generator=g).to(dtype)
    elif reduction == "sample":
        grad_kl = torch.randn(rows, generator=g)
    else:
        grad_kl = torch.randn((), generator=g)
    return grad_z, grad_kl


def run_op(op, mu, lv, mu_p, lv_p, reduction, grad_z, grad_kl, transform=None, device="cpu"):
    """Run a registered op with autograd on ``transform`` views of the inputs (e.g. non-contiguous)
    on ``device``.

    Returns (z, kl, grads with respect to the op's arguments), on the CPU.
    """
    transform = transform or (lambda t: t)
    leaves = [t.detach().to(device).requires_grad_() for t in (mu, lv, mu_p, lv_p) if t is not None]
    args = [transform(t) for t in leaves]
    m, lv = args[0], args[1]
    mp, lp = (args[2], args[3]) if mu_p is not None else (None, None)
    seed = torch.tensor(SEED)
    z = kl = None
    if op == "gaussian_kl":
        kl = library.gaussian_kl(m, lv, mp, lp, reduction)
    elif op == "reparameterize":
        z = library.reparameterize(m, lv, seed)
    else:
        z, kl = library.sample_and_kl(m, lv, mp, lp, seed, reduction)
    loss = torch.zeros((), device=device)
    if z is not None:
        loss = loss + (z * grad_z.to(device)).float().sum()
    if kl is not None:
        loss = loss + (kl * grad_kl.to(device, kl.dtype)).float().sum()
    grads = torch.autograd.grad(loss, args)
    cpu = [None if t is None else t.cpu() for t in (z, kl)]
    return cpu[0], cpu[1], [g.cpu() for g in grads]


def check(kernel, op, shape, dtype, reduction, prior, scale=1.0, transform=None):
    base = make_inputs(shape, dtype, prior, scale)
    view = transform or (lambda t: t)
    mu, lv, mu_p, lv_p = (None if t is None else view(t).contiguous() for t in base)
    rows = mu.shape[0] if mu.dim() else 1
    grad_z, grad_kl = upstream(mu.shape, dtype, reduction, rows)
    with kernel_in_use(kernel):
        z, kl, grads = run_op(op, *base, reduction, grad_z, grad_kl, transform, device_of(kernel))
    eps = philox_randn(SEED, mu.numel()).view(mu.shape) if z is not None else None
    z_ref, kl_ref, grads_ref = exact(
        mu,
        lv,
        mu_p,
        lv_p,
        reduction,
        eps,
        grad_z if z is not None else None,
        grad_kl if kl is not None else None,
    )
    if z is not None:
        assert z.dtype == dtype and z.shape == mu.shape and z.is_contiguous()
        assert_close(z, z_ref, dtype, "z")
    if kl is not None:
        assert kl.dtype == (dtype if reduction == "none" else torch.float32)
        assert kl.shape == kl_ref.shape
        assert_close(kl, kl_ref, dtype, "kl")
    names = ("dmu", "dlogvar", "dmu_p", "dlogvar_p")
    assert len(grads) == len(grads_ref)
    for name, got, want in zip(names, grads, grads_ref, strict=False):
        assert got.dtype == dtype and got.shape == mu.shape
        assert_close(got, want, dtype, name)


def checked_shape(kernel: str) -> tuple[int, ...]:
    """Rows of 2,807 elements: three Triton column blocks of TILE, the last one partial, and odd
    sizes throughout. 41 rows, or 5 for Triton in its interpreter, whose time grows with the
    elements (~4.5 s a case at 41 rows on 2 CPU cores); test_large runs Triton on a large shape."""
    return (5, 401, 7) if kernel == "triton" and TRITON_DEVICE == "cpu" else (41, 401, 7)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [False, True], ids=["std", "prior"])
@pytest.mark.parametrize("op", ["gaussian_kl", "sample_and_kl"])
def test_values_and_grads(kernel, op, dtype, reduction, prior):
    check(kernel, op, checked_shape(kernel), dtype, reduction, prior)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reparameterize(kernel, dtype):
    check(kernel, "reparameterize", checked_shape(kernel), dtype, "sample", False)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "shape",
    # (37, 128), (37, 2, 6): several narrow rows per Triton program, the last one partly past the end
    [(), (1,), (1, 1), (5,), (3, 4097), (2, 3, 5, 7), (37, 128), (37, 2, 6), (0, 4)],
    ids=str,
)
def test_shapes(kernel, shape):
    for reduction in ("none", "sample", "mean"):
        check(kernel, "sample_and_kl", shape, torch.float32, reduction, True)


@pytest.mark.parametrize("kernel", KERNELS)
def test_large(kernel):
    """More than 2**20 elements, rows spanning many blocks, in each dtype. Triton's interpreter, whose
    time grows with the elements: float32, a quarter of the rows (still 144 blocks a row)."""
    interpreted = kernel == "triton" and TRITON_DEVICE == "cpu"
    dtypes = (torch.float32,) if interpreted else DTYPES
    for dtype in dtypes:
        check(kernel, "sample_and_kl", (2 if interpreted else 8, 64, 48, 48), dtype, "sample", True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "transform",
    [lambda t: t.transpose(0, 1), lambda t: t[:, ::2], lambda t: t[:1].expand(4, -1, -1)],
    ids=["transposed", "strided", "expanded"],
)
def test_non_contiguous(kernel, transform):
    for reduction in ("none", "batchmean"):
        check(kernel, "sample_and_kl", (6, 10, 9), torch.float32, reduction, True, transform=transform)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """The NHWC-contiguous twin of an NCHW tensor: the same elements in channels_last's memory order."""
    return t.permute(0, 2, 3, 1).contiguous()


def from_twin(t: torch.Tensor) -> torch.Tensor:
    """An NHWC tensor viewed back as NCHW (channels_last strides)."""
    return t.permute(0, 3, 1, 2)


def channel_half(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the first half of ``chunk(2, 1)`` of a channels_last tensor: not dense, but its
    strides still put the batch dim first and the channels last."""
    return channels_last(torch.cat([t, torch.zeros_like(t)], 1)).chunk(2, 1)[0]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sample"])
@pytest.mark.parametrize("layout", [channels_last, channel_half], ids=["channels_last", "channel_half"])
def test_channels_last_equals_its_nhwc_twin(kernel, dtype, reduction, layout):
    """Inputs whose strides order the channels last are walked in that order: z, KL and every
    gradient equal (torch.equal) those of the NHWC-contiguous twin, and come back in channels_last."""
    shape = (3, 5, 4, 6)
    inputs = make_inputs(shape, dtype, prior=True)
    grad_z, grad_kl = upstream(shape, dtype, reduction, shape[0])
    twin_grad_kl = nhwc(grad_kl) if reduction == "none" else grad_kl
    device = device_of(kernel)
    with kernel_in_use(kernel):
        z, kl, grads = run_op(
            "sample_and_kl", *inputs, reduction, grad_z, grad_kl, transform=layout, device=device
        )
        z2, kl2, grads2 = run_op(
            "sample_and_kl", *map(nhwc, inputs), reduction, nhwc(grad_z), twin_grad_kl, device=device
        )
    assert z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
    assert torch.equal(z, from_twin(z2))
    if reduction == "none":
        assert kl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(kl, from_twin(kl2))
    else:
        assert torch.equal(kl, kl2)
    for got, want in zip(grads, grads2, strict=True):
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, from_twin(want))


def ops_that_copy(kernel: str, transform) -> set[str]:
    """The copying aten ops one forward and one backward of sample_and_kl ran on ``transform``ed inputs."""
    shape = (4, 8, 5, 7)
    device = device_of(kernel)
    mu, lv, mu_p, lv_p = (transform(t.to(device)) for t in make_inputs(shape, torch.float32, prior=True))
    grad_z = transform(torch.randn(shape, device=device))
    seed = torch.tensor(SEED, device=device)  # where the custom ops keep it: no copy to count
    with (
        kernel_in_use(kernel),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        library.sample_and_kl(mu, lv, mu_p, lv_p, seed, "sample")
        library.gaussian_backward(mu, lv, mu_p, lv_p, seed, grad_z, torch.ones(len(mu), device=device), True)
    return {e.name for e in prof.events()} & {"aten::clone", "aten::copy_", "aten::contiguous"}


@pytest.mark.parametrize(
    "kernel",
    (*CPU_KERNELS, pytest.param("cuda", marks=needs_cuda_kernels), pytest.param("triton", marks=needs_gpu)),
)  # Triton's interpreter copies every argument to NumPy and back; the reference computes in float32
def test_channels_last_inputs_are_not_copied(kernel):
    assert ops_that_copy(kernel, channels_last) == set()
    if kernel.startswith("cpu"):
        assert ops_that_copy(kernel, channel_half) == set(), "the CPU loops read the halves' rows as they lie"
    else:
        assert "aten::clone" in ops_that_copy(kernel, channel_half), "non-dense halves are compacted"
    assert ops_that_copy(kernel, lambda t: t.transpose(0, 1)), "a layout the kernels cannot walk is copied"


def nchw_half(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the first half of ``chunk(2, 1)`` of a contiguous NCHW tensor: rows of C * H * W
    elements, 2 * C * H * W apart."""
    return torch.cat([t, torch.zeros_like(t)], 1).chunk(2, 1)[0]


def row_slice(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the first half of each last-dim row of a tensor twice as wide."""
    return torch.cat([t, torch.zeros_like(t)], -1)[..., : t.shape[-1]]


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [nchw_half, row_slice], ids=["nchw_half", "row_slice"])
def test_cpu_loops_read_evenly_spaced_rows_where_they_lie(kernel, dtype, layout):
    """Inputs whose elements lie in evenly spaced rows of contiguous elements (slices of a dense
    tensor): no copy, and z, KL and every gradient equal (torch.equal) those of the same values
    made contiguous."""
    shape = (3, 5, 4, 6)
    inputs = make_inputs(shape, dtype, prior=True)
    grad_z, grad_kl = upstream(shape, dtype, "none", shape[0])
    with kernel_in_use(kernel):
        got = run_op("sample_and_kl", *inputs, "none", grad_z, grad_kl, transform=layout)
        want = run_op(
            "sample_and_kl", *inputs, "none", grad_z, grad_kl, transform=lambda t: layout(t).contiguous()
        )
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True):
        assert torch.equal(a, b)
    assert ops_that_copy(kernel, layout) == set()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_log_variances(kernel, dtype):
    """logvar in [-30, 30], |mu| up to 1e4: finite wherever the exact answer fits the dtype."""
    shape = (4, 2000)
    g = torch.Generator().manual_seed(5)
    mu = ((torch.rand(shape, generator=g) * 2 - 1) * 1e4).to(dtype)
    lv = ((torch.rand(shape, generator=g) * 2 - 1) * 30).to(dtype)
    mu_p = ((torch.rand(shape, generator=g) * 2 - 1) * 1e4).to(dtype)
    lv_p = ((torch.rand(shape, generator=g) * 2 - 1) * 30).to(dtype)
    lv[0, :4] = torch.tensor([-30.0, 30.0, -30.0, 30.0])
    lv_p[0, :4] = torch.tensor([30.0, -30.0, -30.0, 30.0])
    grad_z, grad_kl = torch.ones(shape, dtype=dtype), torch.ones(shape, dtype=dtype)
    for prior in (False, True):
        mp, lp = (mu_p, lv_p) if prior else (None, None)
        with kernel_in_use(kernel):
            z, kl, grads = run_op(
                "sample_and_kl", mu, lv, mp, lp, "none", grad_z, grad_kl, device=device_of(kernel)
            )
        eps = philox_randn(SEED, mu.numel()).view(shape)
        z_ref, kl_ref, grads_ref = exact(mu, lv, mp, lp, "none", eps, grad_z, grad_kl)
        assert_close(z, z_ref, dtype, "z")
        assert_close(kl, kl_ref, dtype, "kl")
        for got, want in zip(grads, grads_ref, strict=True):
            assert_close(got, want, dtype, "grad")


@pytest.mark.parametrize(
    "shape",
    [(3, 5000), (3, 4999), (37, 128), (37, 10)],
    ids=["rows-aligned-to-4", "rows-unaligned", "narrow-rows-aligned", "narrow-rows-unaligned"],
)
def test_kernels_agree_on_noise(shape):
    """CPU C++, Triton, CUDA and the PyTorch Philox give the same noise for the same seed and
    offsets (Triton draws whole groups of four when rows start at multiples of 4, single lanes
    otherwise), within a few ulps of each Box-Muller radius: the uint32 draws are equal bit for bit
    (test_philox_matches_triton_bitwise), the transcendental functions differ in their last bits."""
    mu = torch.zeros(shape)
    lv = torch.zeros(shape)
    seed = torch.tensor(2**40 + 12345)
    noise = {}
    for kernel in (*CPU_KERNELS, "triton", *(("cuda",) if CUDA_KERNELS else ()), "reference"):
        device = device_of(kernel)
        with kernel_in_use(kernel):
            noise[kernel] = library.reparameterize(mu.to(device), lv.to(device), seed.to(device)).cpu()
    expected = philox_randn(int(seed), mu.numel()).view(mu.shape)
    tolerance = noise_tolerance(int(seed), mu.numel()).view(mu.shape)
    for kernel, z in noise.items():
        worst = ((z - expected).abs() / tolerance).max().item()
        assert worst <= 1, f"{kernel}: noise off by {worst:.2f}x the tolerance of {NOISE_ULPS} ulps"


@pytest.mark.parametrize("kernel", KERNELS)
def test_prior_gradients_are_zero_when_no_gradient_reaches_the_kl(kernel):
    """The backward op called with a gradient for z only: the prior's gradients are zeros, in every
    kernel (they were left unwritten once)."""
    device = device_of(kernel)
    mu, lv, mu_p, lv_p = (t.to(device) for t in make_inputs((3, 1000), torch.float32, prior=True))
    grad_z = torch.randn(3, 1000, device=device)
    with kernel_in_use(kernel):
        for _ in range(3):  # fresh allocations may hold anything: try a few
            dmu, _, dmu_p, dlv_p = library.gaussian_backward(
                mu, lv, mu_p, lv_p, torch.tensor(SEED), grad_z, None, False
            )
            assert torch.equal(dmu_p, torch.zeros_like(mu)) and torch.equal(dlv_p, torch.zeros_like(mu))
            assert torch.equal(dmu, grad_z)


def test_cpu_isa_paths_are_chosen_by_name_and_refused_when_missing():
    if backend.extension() is None:
        pytest.skip("no C++ extension")
    isas = backend.cpu_isas()
    assert isas[-1] == "baseline" and backend.cpu_isa() in isas
    with backend.use_cpu_isa("baseline"):
        assert backend.cpu_isa() == "baseline"
    with pytest.raises(RuntimeError, match="unknown CPU ISA path 'neon'"):
        backend.set_cpu_isa("neon")
    missing = [isa for isa in ("avx512", "avx2") if isa not in isas]
    for isa in missing:
        with pytest.raises(RuntimeError, match="this CPU lacks it"):
            backend.set_cpu_isa(isa)


def assert_non_finite_like(actual: torch.Tensor, expected: torch.Tensor, nan_at: torch.Tensor, dtype, what):
    """NaN wherever a NaN input reaches (``nan_at``), non-finite wherever the float64 reference is,
    and finite and close everywhere else."""
    expected = expected.double()
    assert torch.isnan(actual[nan_at]).all(), f"{what}: a NaN input gave a number"
    bad = ~torch.isfinite(expected)
    assert (~torch.isfinite(actual[bad])).all(), f"{what}: a finite value where the reference is not"
    assert_close(actual[~bad], expected[~bad], dtype, what)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "sample", "sum"])
@pytest.mark.parametrize("prior", [False, True], ids=["std", "prior"])
def test_nan_and_infinite_inputs(kernel, dtype, reduction, prior):
    """The documented semantics: NaN in gives NaN out in the elements it reaches (its row's sample
    KL, the sum), infinities give what IEEE arithmetic of the formula gives (the reference), never a
    crash and never a finite value where the reference has none; other elements are unaffected.
    Gradients are NaN exactly where the reference's are."""
    shape = (3, 257)
    mu, lv, mu_p, lv_p = make_inputs(shape, dtype, prior)
    nan, inf = float("nan"), float("inf")
    mu[0, 1], lv[1, 2], mu[2, 3], lv[0, 5], lv[1, 7] = nan, nan, inf, inf, -inf
    nan_elems = torch.zeros(shape, dtype=torch.bool)
    nan_elems[0, 1] = nan_elems[1, 2] = True
    if prior:
        mu_p[2, 10], lv_p[0, 11], lv_p[2, 12] = nan, nan, -inf
        nan_elems[2, 10] = nan_elems[0, 11] = True
    grad_z, grad_kl = upstream(shape, dtype, reduction, shape[0])
    with kernel_in_use(kernel):
        z, kl, grads = run_op(
            "sample_and_kl", mu, lv, mu_p, lv_p, reduction, grad_z, grad_kl, device=device_of(kernel)
        )
    eps = philox_randn(SEED, mu.numel()).view(shape)
    z_ref, kl_ref, grads_ref = exact(mu, lv, mu_p, lv_p, reduction, eps, grad_z, grad_kl)
    z_nan = nan_elems.clone()
    if prior:  # z does not depend on the prior
        z_nan[2, 10] = z_nan[0, 11] = False
    assert_non_finite_like(z, z_ref, z_nan | torch.isnan(z_ref), dtype, "z")
    kl_nan = {"none": nan_elems, "sample": nan_elems.any(1), "sum": torch.tensor(True)}[reduction]
    assert_non_finite_like(kl, kl_ref, kl_nan | torch.isnan(kl_ref), dtype, "kl")
    for name, got, want in zip(("dmu", "dlogvar", "dmu_p", "dlogvar_p"), grads, grads_ref, strict=False):
        # a gradient is NaN where the reference's is: d/dmu of the standard KL is mu whatever logvar is
        assert_non_finite_like(got, want, torch.isnan(want), dtype, name)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpu_kernels_give_the_same_bits_on_any_thread_count(kernel, reduction):
    """The CPU loops split fixed blocks among the threads: one thread and five give equal noise,
    KL and gradients (the test suite itself may run on one thread a worker)."""
    shape = (6, 40, 33, 35)  # rows of several blocks, the last one partial
    inputs = make_inputs(shape, torch.float32, prior=True)
    grad_z, grad_kl = upstream(shape, torch.float32, reduction, shape[0])
    results = []
    for n in (1, 5):
        with kernel_in_use(kernel), torch_threads(n):
            results.append(run_op("sample_and_kl", *inputs, reduction, grad_z, grad_kl))
    (z1, kl1, grads1), (z5, kl5, grads5) = results
    assert torch.equal(z1, z5) and torch.equal(kl1, kl5)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads5, strict=True))
