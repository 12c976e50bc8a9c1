"""Benchmark the fused ops against eager and torch.compile'd PyTorch, in one process.

Ops: the Gaussian ones on latent shapes, and the discretized-logistic likelihoods (per image sums)
on CIFAR-10 decoder outputs (``cifar-b32``: a [32, 100, 32, 32] mixture of 10 logistics, or six
channels for the single logistic; ``-cl``: channels_last). For each op, shape and pass (forward,
backward, forward+backward) it times eager PyTorch (the reference), the torch.compile'd reference
and every fused backend available on the device, and reports medians, speed-ups over eager and
memory. Memory: on CUDA the peak allocated during the pass; on CPU the activation memory the op
keeps for backward (its outputs plus saved tensors), which is what a training step holds. Writes
CSV and a Markdown table.

    python -m bench.bench_ops [--device cpu|cuda] [--repeats 20] [--isa avx512|avx2|baseline]

On CPU the title names the CPU, its SIMD flags and the ISA path of the fused kernels (``--isa``
forces one the CPU has; the file names carry it then). Every run also writes the GPU on paper
(bench.on_paper): ``ops_on_paper_<dtype>.csv/.md``; ``--on-paper-only`` writes just that.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import on_paper
from bench.report import write_report
from fasthvae import ops
from fasthvae.hardware import cpu_flags, cpu_name
from fasthvae.ops import backend, reference

SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")

SHAPES = {
    "vae-latent": (256, 128),
    "hvae-conv": (256, 32, 16, 16),
    "large": (256, 64, 32, 32),
    "hvae-conv-cl": (256, 32, 16, 16),
}
# Shapes whose Gaussians come as a channels_last conv layer gives them: mean and log-variance the
# two channel halves (``chunk(2, 1)``) of one channels_last output, the prior's likewise.
CHANNELS_LAST_HALVES = {"hvae-conv-cl"}
GAUSSIAN_OPS = ("kl-std", "kl-prior", "reparameterize", "sample_and_kl-prior")
# Images [B, H, W] of 3 channels; the decoder output has 10 K = 100 channels (mixture) or 6.
IMAGE_SHAPES = {"cifar-b32": (32, 32, 32), "cifar-b32-cl": (32, 32, 32), "cifar-b128": (128, 32, 32)}
LIKELIHOOD_OPS = ("mixture-nll", "logistic-nll")
OPS = GAUSSIAN_OPS + LIKELIHOOD_OPS
PASSES = ("forward", "backward", "forward+backward")


def shapes_of(op: str, names: list[str]) -> list[str]:
    """The shapes among ``names`` that ``op`` runs on."""
    return [n for n in names if (n in IMAGE_SHAPES) == (op in LIKELIHOOD_OPS)]


def likelihood_fn(op: str, fused: bool, one_pass: bool = False) -> Callable:
    """-log p(x) summed per image: the reference formula (plain PyTorch) or the fused op (the
    mixture's with ``one_pass``, as the models' loss runs it)."""

    def fn(x, decoded):
        if op == "mixture-nll":
            if fused:
                return (ops.mixture_nll(x, decoded, one_pass=one_pass),)
            return (reference.reduce(reference.mixture_nll(x, decoded), "sample", decoded.dtype),)
        mean, log_scale = decoded[:, :3], decoded[:, 3:]
        if fused:
            return (ops.logistic_nll(x, mean, log_scale),)
        return (reference.reduce(reference.logistic_nll(x, mean, log_scale), "sample", decoded.dtype),)

    return fn


def reference_fn(op: str) -> Callable:
    """Plain PyTorch: what a user writes without fasthvae (eager noise from torch.randn)."""
    if op in LIKELIHOOD_OPS:
        return likelihood_fn(op, fused=False)

    def fn(mu, lv, mu_p, lv_p):
        if op == "kl-std":
            return (reference.gaussian_kl(mu, lv, reduction="sample"),)
        if op == "kl-prior":
            return (reference.gaussian_kl(mu, lv, mu_p, lv_p, reduction="sample"),)
        eps = torch.randn_like(mu)
        if op == "reparameterize":
            return (reference.reparameterize(mu, lv, eps),)
        return reference.sample_and_kl(mu, lv, eps, mu_p, lv_p, reduction="sample")

    return fn


def fused_fn(op: str) -> Callable:
    if op in LIKELIHOOD_OPS:
        return likelihood_fn(op, fused=True)

    def fn(mu, lv, mu_p, lv_p):
        if op == "kl-std":
            return (ops.gaussian_kl(mu, lv),)
        if op == "kl-prior":
            return (ops.gaussian_kl(mu, lv, mu_p, lv_p),)
        if op == "reparameterize":
            return (ops.reparameterize(mu, lv),)
        return ops.sample_and_kl(mu, lv, mu_p, lv_p)

    return fn


def image_inputs(op: str, shape_name: str, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """8-bit images x [B, 3, H, W] and a decoder output that requires grad (channels_last for -cl)."""
    b, h, w = IMAGE_SHAPES[shape_name]
    x = torch.randint(0, 256, (b, 3, h, w), device=device).float() / 255
    decoded = torch.randn(b, 100 if op == "mixture-nll" else 6, h, w, device=device, dtype=dtype)
    if shape_name.endswith("-cl"):
        decoded = decoded.contiguous(memory_format=torch.channels_last)
    return [x, decoded.requires_grad_()]


def inputs(
    op: str, shape: tuple[int, ...], device: str, dtype: torch.dtype, channels_last_halves: bool = False
) -> list[torch.Tensor | None]:
    if channels_last_halves:
        doubled = (shape[0], 2 * shape[1], *shape[2:])
        parents = [torch.randn(doubled, device=device, dtype=dtype).requires_grad_() for _ in range(2)]
        ts = [h for p in parents for h in p.contiguous(memory_format=torch.channels_last).chunk(2, 1)]
    else:
        ts = [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(4)]
    return ts if "prior" in op else [ts[0], ts[1], None, None]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pass(fn: Callable, args: list, which: str, device: str, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one pass."""
    leaves = [a for a in args if a is not None and a.requires_grad]

    def forward():
        return fn(*args)

    def backward(outs):
        grads = [torch.ones_like(o) for o in outs]
        torch.autograd.grad(outs, leaves, grads)

    times = []
    for i in range(warmup + repeats):
        outs = forward() if which == "backward" else None  # untimed forward for a backward-only pass
        _sync(device)
        start = time.perf_counter()
        if which == "forward":
            with torch.no_grad():
                forward()
        elif which == "backward":
            backward(outs)
        else:
            backward(forward())
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bytes(fn: Callable, args: list, device: str) -> int:
    """CUDA: peak bytes allocated in forward+backward. CPU: bytes the op keeps for backward."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs = fn(*args)
        leaves = [a for a in args if a is not None and a.requires_grad]
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    leaves = {a.untyped_storage().data_ptr() for a in args if a is not None}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in leaves:  # inputs are the caller's memory, not the op's
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = fn(*args)
    for o in outs:
        kept[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return sum(kept.values())


def with_backend(name: str, fn: Callable) -> Callable:
    def run(*args):
        with backend.use_backend(name):
            return fn(*args)

    return run


def implementations(op: str, device: str) -> dict[str, Callable]:
    """Eager, compiled and fused versions of op; the compiled one from a fresh dynamo cache, so that
    benchmarking many ops and shapes never hits the recompile limit (and silently runs eager)."""
    torch._dynamo.reset()
    compiled = torch.compile(reference_fn(op), dynamic=False)
    impls: dict[str, Callable] = {"eager": reference_fn(op), "compiled": compiled}
    for name in ("cpu", "triton", "cuda"):
        if backend.available(name, torch.device(device)):
            impls[f"fasthvae-{name}"] = with_backend(name, fused_fn(op))
    if op == "mixture-nll" and backend.available("cpu", torch.device(device)):
        impls["fasthvae-cpu-one-pass"] = with_backend("cpu", likelihood_fn(op, fused=True, one_pass=True))
    return impls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    names = [*SHAPES, *IMAGE_SHAPES]
    parser.add_argument("--shapes", nargs="+", default=names, choices=names, help="each op takes its kind")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--isa", default=None, help="CPU: the fused kernels' ISA path (default: the best)")
    parser.add_argument("--on-paper-only", action="store_true", help="only bytes, ideal GPU times, registers")
    args = parser.parse_args()
    gaussian = [op for op in args.ops if op in GAUSSIAN_OPS]
    latents = {name: SHAPES[name] for name in args.shapes if name in SHAPES}
    paper = on_paper.rows(gaussian, latents, args.dtype)
    if "mixture-nll" in args.ops:
        images = {n: IMAGE_SHAPES[n] for n in args.shapes if n in IMAGE_SHAPES and not n.endswith("-cl")}
        paper += on_paper.mixture_rows(images, args.dtype)
    paper_stem = args.out / f"ops_on_paper_{args.dtype}"
    if paper:
        write_report(paper, paper_stem, on_paper.HEADER, on_paper.cells, on_paper.TITLE, on_paper.INTRO)
        print(f"wrote {paper_stem}.csv and .md")
    if args.on_paper_only:
        return
    if args.isa:
        backend.set_cpu_isa(args.isa)
    dtype = getattr(torch, args.dtype)
    rows = []
    for op in args.ops:
        for shape_name in shapes_of(op, args.shapes):
            impls = implementations(op, args.device)
            if op in LIKELIHOOD_OPS:
                x = image_inputs(op, shape_name, args.device, dtype)
            else:
                x = inputs(op, SHAPES[shape_name], args.device, dtype, shape_name in CHANNELS_LAST_HALVES)
            eager_ms: dict[str, float] = {}
            compiled_ms: dict[str, float] = {}
            eager_mem = memory_bytes(impls["eager"], x, args.device)
            for impl_name, fn in impls.items():
                mem = memory_bytes(fn, x, args.device)
                for which in PASSES:
                    ms = time_pass(fn, x, which, args.device, args.repeats) * 1e3
                    eager_ms.setdefault(which, ms)
                    if impl_name == "compiled":
                        compiled_ms[which] = ms
                    row = {
                        "op": op, "shape": shape_name, "pass": which, "impl": impl_name,
                        "median_ms": round(ms, 3), "speedup_vs_eager": round(eager_ms[which] / ms, 2),
                        "speedup_vs_compiled": round(compiled_ms[which] / ms, 2) if compiled_ms else "",
                        "memory_MiB": round(mem / 2**20, 2),
                        "memory_vs_eager": round(mem / max(eager_mem, 1), 2),
                    }  # fmt: skip
                    rows.append(row)
                    print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        flags = " ".join(f for f in SIMD_FLAGS if f in cpu_flags()) or "none of " + " ".join(SIMD_FLAGS)
        isa = backend.cpu_isa() if backend.extension() else "no extension"
        device_name = (
            f"{cpu_name()}, {torch.get_num_threads()} threads, flags: {flags}; kernels' ISA path: {isa}"
        )
    suffix = f"_{args.isa}" if args.isa else ""
    stem = args.out / f"ops_{args.device}_{args.dtype}{suffix}"
    header = [
        "op",
        "shape",
        "pass",
        "impl",
        "median ms",
        "x eager",
        "x compiled",
        "memory MiB",
        "memory / eager",
    ]
    write_report(
        rows, stem, header, lambda r: [str(v) for v in r.values()], f"bench_ops ({device_name}, {args.dtype})"
    )
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
