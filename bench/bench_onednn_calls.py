"""What ATen's call path around oneDNN's convolutions costs: each of the deep model's convolution
shapes as ``F.conv2d`` and ``aten.convolution_backward`` (bf16 or fp32, channels_last) against the same
oneDNN primitives called directly (``bench/onednn_calls.cpp``: built once per shape, executed on the
tensors' memory), in one process, alternating in rounds; medians, microseconds a call.

The direct calls need a standalone oneDNN, which fasthvae does not otherwise use (torch's own is
linked in without its API): ``pip install onednn-cpu-gomp onednn-devel-cpu-gomp`` (GNU OpenMP, the
runtime torch loads, so one thread pool). Writes ``onednn_calls_<dtype>.{csv,md}``.

    python -m bench.bench_onednn_calls [--dtype bfloat16|float32] [--onednn PREFIX] [--calls 100] [--rounds 5]
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import write_report
from fasthvae.hardware import machine
from fasthvae.ops.onednn_conv import build_args, build_name, onednn_files

SOURCE = Path(__file__).with_name("onednn_calls.cpp")
# (input channels, side, output channels, kernel) at batch 32: the deep model's cells, heads and
# projections from 32x32 down to 1x1.
SHAPES = [(16, 32, 16, 3), (16, 16, 16, 3), (16, 8, 16, 3), (16, 4, 16, 3), (64, 8, 16, 1), (64, 4, 64, 1),
          (16, 1, 16, 1), (64, 1, 32, 1)]  # fmt: skip


def build(prefix: Path):
    """The extension, built against oneDNN under ``prefix``."""
    header, lib = onednn_files(prefix)
    if not header.exists() or not lib.exists():
        missing = header if not header.exists() else lib
        sys.exit(
            f"bench_onednn_calls: no standalone oneDNN under {prefix} ({missing} is missing): "
            "pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or pass --onednn PREFIX"
        )
    from torch.utils.cpp_extension import load

    return load(build_name("fasthvae_bench_onednn_calls"), [str(SOURCE)], **build_args(prefix))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def implementations(
    ext, dtype: torch.dtype, batch: int, c: int, side: int, o: int, k: int
) -> tuple[dict[str, Callable[[], object]], str]:
    """The four timed calls on one shape, on random channels_last tensors of ``dtype``, and the
    kernels oneDNN chose for it."""
    cl, pad = torch.channels_last, k // 2
    x = torch.randn(batch, c, side, side).to(dtype).contiguous(memory_format=cl)
    grad_y = torch.randn(batch, o, side, side).to(dtype).contiguous(memory_format=cl)
    weight = torch.randn(o, c, k, k) * 0.1
    bias = torch.randn(o).to(dtype).float()  # the values F.conv2d's bias of ``dtype`` holds
    w_aten, b_aten = weight.to(dtype).contiguous(memory_format=cl), bias.to(dtype)
    packed, packed_backward = ext.pack_weights(x, weight)
    grads = [True, True, True]
    calls = {
        "aten forward": lambda: F.conv2d(x, w_aten, b_aten, padding=pad),
        "direct forward": lambda: ext.forward(x, weight, packed, bias),
        "aten backward": lambda: torch.ops.aten.convolution_backward(
            grad_y, x, w_aten, [o], [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, grads
        ),
        "direct backward": lambda: ext.backward(grad_y, x, weight, packed_backward),
    }
    return calls, ext.kernels(x, weight)


def measure(impls: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median us a call of each timed implementation, their windows alternating in rotated order."""
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        per_call_us(impls[name], 10)  # warm-up
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(per_call_us(impls[name], calls))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--onednn", type=Path, default=Path(sys.prefix), help="oneDNN's install prefix")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--calls", type=int, default=100, help="calls a timed window")
    parser.add_argument("--rounds", type=int, default=5, help="windows of each implementation, alternating")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()
    ext = build(args.onednn)
    torch.manual_seed(0)
    dtype, rows = getattr(torch, args.dtype), []
    for c, side, o, k in SHAPES:
        try:
            impls, kernels = implementations(ext, dtype, args.batch_size, c, side, o, k)
        except RuntimeError as error:
            sys.exit(f"bench_onednn_calls: {str(error).splitlines()[0]}")
        forward_diff = relative_difference(impls["aten forward"](), impls["direct forward"]())
        pairs = zip(impls["aten backward"](), impls["direct backward"](), strict=True)
        grad_diffs = [relative_difference(a, b) for a, b in pairs]
        us = measure(impls, args.calls, args.rounds)
        rows.append(
            {
                "shape": f"{args.batch_size}x{c}x{side}x{side} -> {o}, {k}x{k}",
                "kernels": kernels,
                **{f"{name.replace(' ', '_')}_us": round(v, 1) for name, v in us.items()},
                "forward_saved_us": round(us["aten forward"] - us["direct forward"], 1),
                "backward_saved_us": round(us["aten backward"] - us["direct backward"], 1),
                "forward_rel_diff": f"{forward_diff:.2g}",
                "grad_rel_diffs": ", ".join(f"{d:.2g}" for d in grad_diffs),
            }
        )
        print(rows[-1], flush=True)
    header = ["shape", "oneDNN kernels (fwd / bwd data / bwd weights)", "F.conv2d us", "direct us",
              "saved", "aten.convolution_backward us", "direct us", "saved",
              "relative difference: output; grads of x, weight, bias"]  # fmt: skip

    def cells(row: dict) -> list[str]:
        times = ["aten_forward_us", "direct_forward_us", "forward_saved_us", "aten_backward_us",
                 "direct_backward_us", "backward_saved_us"]  # fmt: skip
        diffs = f"{row['forward_rel_diff']}; {row['grad_rel_diffs']}"
        return [row["shape"], row["kernels"], *(str(row[t]) for t in times), diffs]

    intro = (
        f"{args.dtype}, channels_last, batch {args.batch_size}; median of {args.rounds} alternating "
        f"windows of {args.calls} calls. ATen: `F.conv2d` and `aten.convolution_backward` (all three "
        "gradients); direct: the same oneDNN primitives built once per shape and executed on the "
        "tensors' memory (`bench/onednn_calls.cpp`; the weights reordered once into their layouts, "
        "outside the timing), the weight and bias gradients in float32. Relative difference: the "
        "largest against the largest value."
    )
    title = f"oneDNN called directly, {machine()}"
    print(write_report(rows, args.out / f"onednn_calls_{args.dtype}", header, cells, title, intro))


if __name__ == "__main__":
    main()
