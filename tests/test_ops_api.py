"""The public drop-in API: reproducibility, noise statistics, torch.library, torch.compile, errors."""

import ast
import csv
import itertools
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fasthvae import ops
from fasthvae.hardware import usable_cpu_flags
from fasthvae.nn import GaussianKL, Reparameterize, SampleAndKL
from fasthvae.ops import backend, library, reference
from fasthvae.ops.philox import philox_randn_at, philox_uint32
from tests.helpers import ROOT, TRITON_DEVICE, TinyHVAE


def gaussians(shape=(8, 16), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(4)]


def test_extension_is_built():
    ext = backend.extension()
    assert ext is not None, "fasthvae._C is missing: install with `pip install --no-build-isolation -e .`"
    assert backend.resolve(torch.device("cpu"), torch.float32) == "cpu"


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="glibc's libmvec is x86-64 only")
def test_cpu_loops_call_vector_libm():
    """The SIMD loops stay vectorized: the extension calls libmvec's AVX-512 variants of every math
    function, sinf included (GCC fuses sinf/cosf into sincosf, which has none, unless told not to)."""
    so = backend.extension().__file__
    symbols = subprocess.run(["nm", "-D", so], capture_output=True, text=True, check=True).stdout
    for fn in ("expf", "expm1f", "logf", "cosf", "sinf"):
        assert f"_ZGVeN16v_{fn}" in symbols, fn


def test_philox_matches_triton_bitwise():
    """The PyTorch Philox equals Triton's tl.randint4x, and its noise tl.randn4x (element i is output
    i % 4 of group i // 4), for seeds and offsets past 2**32."""
    kernels = pytest.importorskip("tests.triton_kernels", reason="Triton is not installed")

    offsets = torch.cat(
        [torch.arange(300), torch.tensor([2**31 - 1, 2**32 - 1, 2**32, 2**40 + 7, 2**42 + 2])]
    )
    for seed in (0, 1, 2**32 + 5, 2**63 - 25):
        out = torch.empty(len(offsets), device=TRITON_DEVICE)
        ints = torch.empty(4 * len(offsets), dtype=torch.int64, device=TRITON_DEVICE)
        kernels.philox_draw_kernel[(1,)](
            out,
            ints,
            offsets.to(TRITON_DEVICE),
            seed,
            len(offsets),
            BLOCK=kernels.DRAW_BLOCK,
            **kernels.DRAW_OPTIONS,
        )
        assert torch.equal(ints.cpu().view(-1, 4), torch.stack(philox_uint32(seed, offsets), 1))
        torch.testing.assert_close(out.cpu(), philox_randn_at(seed, offsets), rtol=0, atol=2e-6)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 - 25, -5])
def test_philox_reads_a_tensor_seed_as_its_integer(seed):
    """A one-element int64 seed tensor (negative ones as their unsigned 64 bits) keys Philox as the
    same integer does."""
    offsets = torch.cat([torch.arange(64), torch.tensor([2**32 + 3])])
    for a, b in zip(
        philox_uint32(torch.tensor([seed]), offsets), philox_uint32(seed % 2**64, offsets), strict=True
    ):
        assert torch.equal(a, b)


def test_reference_kernels_read_the_seed_where_it_lies(monkeypatch):
    """The reference fallback (float64 inputs, or a device without fused kernels) draws its noise
    from the seed tensor on the inputs' device: never ``Tensor.item()``, which on CUDA is a host
    sync per op and fails under CUDA-graph capture."""
    mu, lv = (torch.randn(4, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    expected = ops.sample_and_kl(mu, lv, generator=torch.Generator().manual_seed(1))[0]

    def host_read(self):
        raise AssertionError("the reference kernels read the seed on the host")

    monkeypatch.setattr(torch.Tensor, "item", host_read)
    z, kl = ops.sample_and_kl(mu, lv, generator=torch.Generator().manual_seed(1), reduction="sum")
    (z.sum() + kl).backward()
    assert torch.equal(z, expected) and torch.isfinite(lv.grad).all()


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_noise_is_standard_normal(kernel):
    stats = pytest.importorskip("scipy.stats")
    n = 1 << 20
    with backend.use_backend(kernel):
        eps = library.reparameterize(torch.zeros(n), torch.zeros(n), torch.tensor(2024)).double()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(stats.skew(eps.numpy())) < 0.02 and abs(stats.kurtosis(eps.numpy())) < 0.04
    ks = stats.kstest(eps[:200_000].numpy(), "norm")
    assert ks.pvalue > 0.001, ks
    # Neighbours share a Philox call (and the cos/sin pairs a radius): still uncorrelated, also in square.
    for lag in (1, 2, 3, 4):
        for values in (eps, eps**2):
            corr = torch.corrcoef(torch.stack([values[:-lag], values[lag:]]))[0, 1].item()
            assert abs(corr) < 5 / n**0.5, (lag, corr)


@pytest.mark.parametrize("name", ["auto", "reference"])
def test_reproducible_with_manual_seed_and_generator(name):
    mu, lv, _, _ = gaussians()
    with backend.use_backend(name):
        torch.manual_seed(7)
        a = ops.reparameterize(mu, lv)
        b = ops.reparameterize(mu, lv)
        torch.manual_seed(7)
        c = ops.reparameterize(mu, lv)
        d = ops.reparameterize(mu, lv, generator=torch.Generator().manual_seed(3))
        e = ops.reparameterize(mu, lv, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, c) and torch.equal(d, e)
    assert not torch.equal(a, b) and not torch.equal(a, d)


def test_public_api_matches_reference_and_broadcasts():
    mu, lv, _, _ = gaussians((4, 3, 5))
    mu_p = torch.randn(1, 3, 1, requires_grad=True)
    lv_p = torch.randn(3, 5, requires_grad=True)
    got = ops.gaussian_kl(mu, lv, mu_p, lv_p, reduction="batchmean")
    want = reference.gaussian_kl(mu, lv, mu_p.expand(4, 3, 5), lv_p.expand(4, 3, 5), "batchmean")
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, (mu_p, lv_p))
    g_want = torch.autograd.grad(want, (mu_p, lv_p))
    for a, b in zip(g_got, g_want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    # A prior given by its mean alone has unit variance.
    torch.testing.assert_close(
        ops.gaussian_kl(mu, lv, mu_p),
        reference.gaussian_kl(mu, lv, mu_p.expand(4, 3, 5), torch.zeros(4, 3, 5)),
    )


def test_sample_and_kl_equals_separate_ops():
    mu, lv, mu_p, lv_p = gaussians()
    torch.manual_seed(1)
    z, kl = ops.sample_and_kl(mu, lv, mu_p, lv_p, reduction="sum")
    torch.manual_seed(1)
    z2 = ops.reparameterize(mu, lv)
    assert torch.equal(z, z2)
    torch.testing.assert_close(kl, ops.gaussian_kl(mu, lv, mu_p, lv_p, reduction="sum"))


def test_opcheck_registered_ops():
    mu, lv, mu_p, lv_p = (t.requires_grad_() for t in gaussians((3, 4, 5)))
    seed = torch.tensor(11)
    for reduction in ("none", "sample", "mean"):
        torch.library.opcheck(library.gaussian_kl, (mu, lv, mu_p, lv_p, reduction))
        torch.library.opcheck(library.gaussian_kl, (mu, lv, None, None, reduction))
        torch.library.opcheck(library.sample_and_kl, (mu, lv, mu_p, lv_p, seed, reduction))
    torch.library.opcheck(library.reparameterize, (mu, lv, seed))
    grad = torch.randn(3, 4, 5)
    plain = [t.detach() for t in (mu, lv, mu_p, lv_p)]  # the backward op has no double backward
    torch.library.opcheck(library.gaussian_backward, (*plain, seed, grad, grad, False))
    torch.library.opcheck(library.gaussian_backward, (*plain, seed, None, torch.randn(3), True))


def test_gradcheck_float64():
    mu, lv, mu_p, lv_p = (t.requires_grad_() for t in gaussians((3, 4), dtype=torch.float64))
    seed = torch.tensor(5)
    for reduction in ("none", "sample", "sum", "mean", "batchmean"):
        assert torch.autograd.gradcheck(
            lambda *a, r=reduction: library.gaussian_kl(*a, r), (mu, lv, mu_p, lv_p)
        )
        assert torch.autograd.gradcheck(
            lambda *a, r=reduction: library.gaussian_kl(*a, None, None, r), (mu, lv)
        )
        assert torch.autograd.gradcheck(
            lambda *a, r=reduction: library.sample_and_kl(*a, seed, r), (mu, lv, mu_p, lv_p)
        )
    assert torch.autograd.gradcheck(lambda m, v: library.reparameterize(m, v, seed), (mu, lv))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = TinyHVAE()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 12)
    loss = compiled(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops_in_graph = {str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"fasthvae.reparameterize.default", "fasthvae.sample_and_kl.default"} <= ops_in_graph


def test_nn_modules():
    mu, lv, mu_p, lv_p = gaussians()
    assert torch.allclose(
        GaussianKL("sum")(mu, lv, mu_p, lv_p), reference.gaussian_kl(mu, lv, mu_p, lv_p, "sum")
    )
    module = Reparameterize(sample_in_eval=False).eval()
    assert torch.equal(module(mu, lv), mu)
    z, kl = SampleAndKL("mean")(mu, lv)
    assert z.shape == mu.shape and kl.shape == ()
    assert "sum" in repr(GaussianKL("sum"))


def test_clear_errors():
    mu, lv, _, _ = gaussians()
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.gaussian_kl(mu, lv, reduction="avg")
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.gaussian_kl(mu, lv[:, :3])
    with pytest.raises(TypeError, match="floating-point"):
        ops.gaussian_kl(mu.long(), lv)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        ops.reparameterize(mu, 1.0)
    with pytest.raises(ValueError, match="one device"):
        ops.gaussian_kl(mu, lv.to("meta"))
    with pytest.raises(ValueError, match="must be one of"):
        ops.set_backend("tpu")
    with backend.use_backend("cuda"), pytest.raises(RuntimeError, match="not available for cpu"):
        ops.gaussian_kl(mu, lv)
    ext = backend.extension()
    seed = torch.tensor([7])
    with pytest.raises(RuntimeError, match="logvar has shape"):
        ext.forward(mu, lv[:, :3].contiguous(), None, None, seed, True, 0)
    with pytest.raises(RuntimeError, match="drawing noise needs a seed"):
        ext.forward(mu, lv, None, None, None, True, 0)
    with pytest.raises(RuntimeError, match="seed must be one int64 element on cpu"):
        ext.forward(mu, lv, None, None, torch.tensor([7, 8]), True, 0)
    with pytest.raises(RuntimeError, match="seed must be one int64 element on cpu"):
        ext.backward(mu, lv, None, None, seed.int(), lv, None, False)


def test_missing_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings, torch; sys.modules['fasthvae._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from fasthvae import ops\n"  # the import looks for the extension (the GELU's registration)
        "    from fasthvae.ops import backend\n"
        "    kl = ops.gaussian_kl(torch.ones(2, 3), torch.zeros(2, 3))\n"
        "    ops.gaussian_kl(torch.ones(2, 3), torch.zeros(2, 3))\n"
        "    assert torch.equal(ops.gelu(torch.ones(3)), torch.nn.functional.gelu(torch.ones(3)))\n"
        "assert backend.resolve(torch.device('cpu'), torch.float32) == 'reference'\n"
        "assert sum('could not be loaded' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "assert torch.allclose(kl, torch.full((2,), 1.5))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "FASTHVAE_BACKEND": "auto"})


def test_triton_compiles_ahead_of_time_for_sm80_without_spills_or_low_occupancy(tmp_path):
    """Every specialization (both tile shapes) compiles; --strict fails on a kernel that spills or
    stays below 50% occupancy, and the report lists each kernel."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fasthvae.ops.triton_aot", "--arch", "80", "--dtype", "bf16",
         "--report", str(tmp_path), "--strict"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "compiled 60 kernels for sm_80" in out.stdout
    assert ": 0 of 60 kernels flagged" in out.stdout
    with open(tmp_path / "triton_resources.csv") as f:
        usages = list(csv.DictReader(f))
    assert len(usages) == 60 and all(0 < int(u["registers"]) <= 64 for u in usages)
    assert "| sm_80 | bf16 | `backward[8x128," in (tmp_path / "triton_resources.md").read_text()


def _tree_python_files() -> list[Path]:
    """Every Python file of the package, the tests and the benchmarks, in a stable order."""
    return sorted(p for folder in ("fasthvae", "tests", "bench") for p in (ROOT / folder).rglob("*.py"))


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Attribute):
        return target.attr == "jit" and isinstance(target.value, ast.Name) and target.value.id == "triton"
    return isinstance(target, ast.Name) and target.id == "jit"


def _jit_functions(tree: ast.Module) -> tuple[dict[str, ast.FunctionDef], list[str]]:
    """A module's top-level ``@triton.jit`` functions by name, and the names of nested ones."""
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    jit = [n for n in functions if any(map(_is_triton_jit, n.decorator_list))]
    top = {n.name: n for n in jit if n in tree.body}
    return top, [n.name for n in jit if n not in tree.body]


def _aot_modules_in_ci() -> tuple[str, ...]:
    """The modules scripts/test.sh passes to the ahead-of-time compile with ``--also``."""
    script = (ROOT / "scripts/test.sh").read_text().replace("\\\n", " ")
    line = next(line for line in script.splitlines() if "-m fasthvae.ops.triton_aot" in line)
    words = line.split()
    start = words.index("--also") + 1
    return tuple(itertools.takewhile(lambda w: not w.startswith(("-", ">")), words[start:]))


def test_every_triton_kernel_is_compiled_ahead_of_time():
    """Every ``@triton.jit`` function in the tree (package, tests and benchmarks) is at module level
    and reached by a specialization the CI's ahead-of-time compile lowers: a kernel the
    interpreter accepts but compiled Triton rejects (e.g. ``enumerate`` in a kernel) fails in CI."""
    pytest.importorskip("triton")
    from fasthvae.ops.triton_aot import specs

    also = _aot_modules_in_ci()
    compiled = [s.kernel.fn for dtype in ("fp32", "fp16", "bf16") for s in specs(dtype, also)]
    roots = {(fn.__module__, fn.__name__) for fn in compiled}
    missing = []
    for path in _tree_python_files():
        tree = ast.parse(path.read_text())
        top, nested = _jit_functions(tree)
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        missing += [f"{module}.{name} (nested: move it to module level)" for name in nested]
        reached = [name for name in top if (module, name) in roots]
        seen = set(reached)
        while reached:  # helpers the compiled kernels call, transitively
            body = top[reached.pop()]
            for name in {n.id for n in ast.walk(body) if isinstance(n, ast.Name)} & set(top) - seen:
                seen.add(name)
                reached.append(name)
        missing += [f"{module}.{name}" for name in top if name not in seen]
    assert not missing, f"@triton.jit functions no ahead-of-time compile reaches: {missing}"


@pytest.mark.parametrize(
    ("registers", "warps", "shared", "expected"),
    [
        (32, 8, 0, 1.0),  # 8 blocks of 8 warps: all 64
        (64, 8, 0, 0.5),  # 2048 registers a warp: 32 warps
        (72, 4, 0, 0.4375),  # 2304 a warp: 28 warps, 7 blocks of 4
        (69, 8, 0, 0.375),  # 2304 a warp: 28 warps, 3 blocks of 8
        (16, 4, 100 * 1024, 0.0625),  # one block fits in shared memory
    ],
)
def test_occupancy_follows_the_cuda_occupancy_calculator(registers, warps, shared, expected):
    from fasthvae.ops.triton_aot import occupancy

    assert occupancy(registers, warps, shared, arch=80) == expected


def test_triton_tiles_hold_whole_narrow_rows_and_split_wide_ones():
    pytest.importorskip("triton")
    from fasthvae.ops.triton_kernels import TILE, tile_shape

    assert tile_shape(128) == (TILE // 128, 128)
    assert tile_shape(100) == (TILE // 128, 128)  # the next power of two
    assert tile_shape(1) == (TILE // 4, 4)  # at least one noise group of four
    assert tile_shape(5000) == (1, TILE)


def test_reference_backend_is_plain_pytorch():
    mu, lv, mu_p, lv_p = (t.requires_grad_() for t in gaussians())
    with backend.use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("error")
        kl = ops.gaussian_kl(mu, lv, mu_p, lv_p)
    assert "fasthvae" not in type(kl.grad_fn).__name__


class ConvLatent(torch.nn.Module):
    """A conv encoder whose latents are channels_last when its input is: sample, KL and a decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.dec = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z, kl = library.sample_and_kl(mu, logvar, None, None, seed, "none")
        return self.dec(z), kl


@pytest.mark.parametrize("graph", ["inference", "training"])
def test_seed_draws_compile_under_inductors_cpp_wrapper(graph):
    """On the CPU the ops draw their seeds through ``fasthvae::cpu_seed``: Inductor's C++ wrapper
    can call it, where it cannot pass ``torch.randint``'s dtype argument; the compiled draws equal
    eager's, and two draws in one graph stay two, in the training graph too (where AOTAutograd's
    common-subexpression pass of torch 2.11 spared only aten's random ops)."""
    torch._dynamo.reset()
    grad = graph == "training"
    mu, logvar = torch.randn(3, 8, requires_grad=grad), torch.randn(3, 8, requires_grad=grad)

    def two_samples(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.reparameterize(mu, logvar), ops.reparameterize(mu, logvar)

    def grad_of(samples: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The gradient in logvar, which holds each sample's noise as the backward regenerates it."""
        return torch.autograd.grad((samples[0] + 2 * samples[1]).sum(), logvar)[0]

    torch.manual_seed(0)
    want = two_samples(mu, logvar)
    with torch._inductor.config.patch(cpp_wrapper=True):
        compiled = torch.compile(two_samples, fullgraph=True)
        torch.manual_seed(0)
        got = compiled(mu, logvar)
        if grad:
            torch.testing.assert_close(grad_of(got), grad_of(want), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(want[0], want[1])
    torch._dynamo.reset()
    torch.manual_seed(1)
    drawn = library.cpu_seed(2**63 - 1)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # randint's draw


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=str)
def test_compiled_op_keeps_the_eager_layout_and_values(memory_format):
    """Under torch.compile the fake kernels promise the layouts the real ones return (Inductor
    asserts them), and compiled values and gradients match eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvLatent().to(memory_format=memory_format)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=memory_format)
    seed = torch.tensor(7)
    results = []
    for run in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        out, kl = run(x, seed)
        (out.square().sum() + kl.sum()).backward()
        results.append((out, kl, [p.grad.clone() for p in model.parameters()]))
    (out, kl, grads), (out_c, kl_c, grads_c) = results
    assert kl_c.stride() == kl.stride()
    assert kl.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_c, kl, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_c, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_caches_are_keyed_by_the_ops_code():
    """torch.compile's cache keys carry a fingerprint of fasthvae/ops, so graphs compiled against
    another version's fake kernels are never reused; a tag the user set is kept."""
    tag = torch.compiler.config.cache_key_tag
    assert re.search(r"fasthvae-ops-[0-9a-f]{12}", tag), tag
    with torch.compiler.config.patch(cache_key_tag="mine"):
        library._tag_compile_caches()
        assert torch.compiler.config.cache_key_tag.startswith("mine+fasthvae-ops-")
        library._tag_compile_caches()  # once only
        assert torch.compiler.config.cache_key_tag.count("fasthvae-ops-") == 1


def test_compile_caches_are_keyed_by_the_cpu_code_path():
    """The tag names ATen's CPU capability, which Inductor vectorizes its C++ kernels for and which
    ATEN_CPU_CAPABILITY caps, so a graph compiled under one cap is never reused under another."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert torch.compiler.config.cache_key_tag.endswith(f"-cpu-{capability}")


def test_custom_ops_give_their_tags_as_a_sequence():
    """``torch.library.custom_op(..., tags=...)`` takes a sequence in torch 2.11 (the oldest torch
    the package supports, the GPU machine's), where a single tag fails the import of the whole
    package; torch 2.14 takes either, so only the source can show it here."""
    single = []
    for path in _tree_python_files():
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "custom_op":
                tags = [k.value for k in call.keywords if k.arg == "tags"]
                if tags and not isinstance(tags[0], (ast.Tuple, ast.List)):
                    single.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not single, f"custom ops whose tags are not a tuple or list: {single}"


_COMPILED_AGAINST_EAGER = """
import sys, torch, torch.nn.functional as F
if sys.argv[1] == "fasthvae":
    import fasthvae.ops.library
f = lambda x: F.gelu(x) * 2 + 1
x = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
print((torch.compile(f)(x) - f(x)).abs().max().item())
"""


@pytest.mark.skipif(
    "avx512f" not in usable_cpu_flags(), reason="needs a CPU with AVX-512 (two vector widths)"
)
def test_a_graph_compiled_under_one_isa_cap_is_not_reused_under_another(tmp_path):
    """One Inductor cache, a process under no cap (AVX-512) then one capped to AVX2, the same graph:
    with fasthvae imported the second compiles its own kernels and matches eager. The same two
    processes without fasthvae show what the tag prevents (torch 2.14.1 reuses the first's code,
    vectorized for 16 floats, under the AVX2 cap: wrong values or a crash); where that no longer
    happens, the test has nothing to show and skips."""

    def run(cap: str, imports: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / imports), "ATEN_CPU_CAPABILITY": cap}
        return subprocess.run(
            [sys.executable, "-c", _COMPILED_AGAINST_EAGER, imports],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def max_error(done: subprocess.CompletedProcess) -> float:
        assert done.returncode == 0, done.stderr[-2000:]
        return float(done.stdout.split()[-1])

    assert max_error(run("avx512", "torch")) < 1e-5
    control = run("avx2", "torch")
    if control.returncode == 0 and max_error(control) < 1e-5:
        pytest.skip("this torch does not reuse a graph compiled under another ISA cap")
    assert max_error(run("avx512", "fasthvae")) < 1e-5
    assert max_error(run("avx2", "fasthvae")) < 1e-5
