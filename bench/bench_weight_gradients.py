"""The weight gradient of each convolution of the deep model, four ways: oneDNN's
backward-weights primitive called directly (``bench/onednn_calls.cpp``), for ungrouped 1x1 kernels
the matrix products ``grad_w = grad_y^T x``, ``grad_b = grad_y^T 1`` over the channels_last pixels in
the BLAS torch calls (from Python), the weight and bias gradients in one pass by
``fasthvae::conv2d_weight_grad`` (``csrc/weight_grad_cpu.cpp``), which
``fasthvae_onednn::conv2d_backward`` runs in oneDNN's place where oneDNN has AVX2 at most (for
ungrouped 1x1 kernels, and larger ones whose groups' input or output channels are a multiple of 8),
and ATen's ``convolution_backward`` asked for those two alone; float32, channels_last, in one process,
alternating in rounds; medians, microseconds a call, and the step's sum over its calls (the shapes
and their counts read off the model's forward).

Run it under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FASTHVAE_CPU_ISA=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2`` for a CPU's AVX2 code paths (the table's title then names them).
Needs a standalone oneDNN, as ``bench_onednn_calls``. Writes ``weight_gradients_<preset>.{csv,md}``.

    python -m bench.bench_weight_gradients [--preset small] [--batch-size 32] [--calls 20] [--rounds 5]
"""

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.bench_onednn_calls import build, measure, relative_difference
from bench.report import write_report
from fasthvae.hardware import machine
from fasthvae.models import DeepHVAE
from fasthvae.nn import use_onednn_conv
from fasthvae.ops.weight_grad import pixel_rows

CONV_OPS = ("fasthvae_onednn.conv2d.default", "fasthvae_onednn.gelu_conv2d.default")


Shape = tuple[int, int, int, int, int]  # (in channels, side, out channels, kernel, groups)


class Convs(TorchDispatchMode):
    """Counts the convolutions the oneDNN ops run (square kernels, "same" padding, as the deep
    model's) by shape."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[Shape] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in CONV_OPS:
            x, weight, padding, groups = args[0], args[1], args[3], args[4]
            k = weight.shape[2]
            if weight.shape[3] == k and list(padding) == [k // 2] * 2:
                self.shapes[(x.shape[1], x.shape[2], weight.shape[0], k, groups)] += 1
        return func(*args, **(kwargs or {}))


def model_shapes(preset: str, batch: int) -> Counter[Shape]:
    """The deep model's convolutions in one forward pass of a batch (its backward runs each once)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    model = DeepHVAE(preset).to(memory_format=cl)
    use_onednn_conv(model)
    x = (torch.randint(0, 256, (batch, 3, 32, 32)).float() / 255).contiguous(memory_format=cl)
    counter = Convs()
    with torch.no_grad(), counter:
        model.loss(x, torch.ones(model.num_levels))
    return counter.shapes


def matmul_gradients(grad_y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two products in the BLAS, the smaller channel count as the product's rows."""
    c, o = x.shape[1], grad_y.shape[1]
    x2, g2 = pixel_rows(x), pixel_rows(grad_y)
    grad_w = torch.mm(x2.t(), g2).t() if c < o else torch.mm(g2.t(), x2)
    return grad_w.view(o, c, 1, 1), torch.mv(g2.t(), torch.ones(g2.shape[0]))


def implementations(ext, batch: int, shape: Shape) -> dict[str, Callable[[], object]]:
    c, side, o, k, groups = shape
    cl = torch.channels_last
    x = torch.randn(batch, c, side, side).contiguous(memory_format=cl)
    grad_y = torch.randn(batch, o, side, side).contiguous(memory_format=cl)
    weight = (torch.randn(o, c // groups, k, k) * 0.1).contiguous(memory_format=cl)
    mask, pad = [False, True, True], [k // 2] * 2
    products = {"matmul": lambda: matmul_gradients(grad_y, x)} if k == 1 and groups == 1 else {}
    return {
        "onednn": lambda: ext.backward_weights(grad_y, x, weight),
        **products,
        "fasthvae": lambda: torch.ops.fasthvae.conv2d_weight_grad(grad_y, x, [k, k], pad, groups),
        "aten": lambda: torch.ops.aten.convolution_backward(
            grad_y, x, weight, [o], [1, 1], pad, [1, 1], False, [0, 0], groups, mask
        )[1:],
    }


IMPLEMENTATIONS = ("onednn", "matmul", "fasthvae", "aten")
GFLOPS = ("fasthvae", "matmul", "onednn")


def ratios(us: dict[str, float]) -> dict[str, object]:
    """oneDNN's and the BLAS's time over fasthvae's, blank where one was not timed."""
    return {
        f"{name}_over_fasthvae": round(us[name] / us["fasthvae"], 2) if name in us else ""
        for name in ("onednn", "matmul")
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--onednn", type=Path, default=Path(sys.prefix), help="oneDNN's install prefix")
    parser.add_argument("--preset", default="small", help="the deep model's preset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20, help="calls a timed window")
    parser.add_argument("--rounds", type=int, default=5, help="windows of each implementation, alternating")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()
    ext = build(args.onednn)
    shapes = model_shapes(args.preset, args.batch_size)
    rows, totals = [], {"1x1": Counter(), "all": Counter()}
    for shape, count in sorted(shapes.items(), key=lambda kv: (kv[0][3], kv[0][4], -kv[0][1], kv[0])):
        c, side, o, k, groups = shape
        impls = implementations(ext, args.batch_size, shape)
        grads = {name: impl() for name, impl in impls.items()}
        diffs = [relative_difference(a, b) for a, b in zip(grads["onednn"], grads["fasthvae"], strict=True)]
        us = measure(impls, args.calls, args.rounds)
        flops = 2 * args.batch_size * side * side * c * o * k * k // groups
        one_by_one = k == 1 and groups == 1
        for name, value in us.items():
            totals["all"][name] += value * count
            if one_by_one:
                totals["1x1"][name] += value * count
        totals["all"]["calls"] += count
        totals["1x1"]["calls"] += count * one_by_one
        rows.append(
            {
                "shape": f"{args.batch_size}x{c}x{side}x{side} -> {o}, {k}x{k}"
                + (f", {groups} groups" if groups > 1 else ""),
                "calls_per_step": count,
                **{f"{name}_us": round(us[name], 1) if name in us else "" for name in IMPLEMENTATIONS},
                **ratios(us),
                **{
                    f"{name}_gflops": round(flops / us[name] / 1e3, 1) if name in us else ""
                    for name in GFLOPS
                },
                "rel_diff_weight_bias": ", ".join(f"{d:.2g}" for d in diffs),
            }
        )
        print(rows[-1], flush=True)
    for kind, label in (("1x1", "the step's ungrouped 1x1 calls"), ("all", "the step's calls")):
        total = totals[kind]
        timed = {
            name: total[name]
            for name in IMPLEMENTATIONS
            if name in total and (kind == "1x1" or name != "matmul")
        }
        rows.append(
            {
                "shape": label,
                "calls_per_step": total["calls"],
                **{f"{name}_us": round(timed[name], 1) if name in timed else "" for name in IMPLEMENTATIONS},
                **ratios(timed),
                **{f"{name}_gflops": "" for name in GFLOPS},
                "rel_diff_weight_bias": "",
            }
        )
    header = ["shape", "calls a step", "oneDNN us", "BLAS products us", "fasthvae us", "ATen us",
              "oneDNN / fasthvae", "BLAS / fasthvae", "fasthvae GFLOP/s", "BLAS GFLOP/s", "oneDNN GFLOP/s",
              "relative difference to oneDNN: weight, bias"]  # fmt: skip

    def cells(row: dict) -> list[str]:
        keys = ["shape", "calls_per_step", "onednn_us", "matmul_us", "fasthvae_us", "aten_us",
                "onednn_over_fasthvae", "matmul_over_fasthvae", "fasthvae_gflops", "matmul_gflops",
                "onednn_gflops", "rel_diff_weight_bias"]  # fmt: skip
        return [str(row[k]) for k in keys]

    intro = (
        f'The deep model `{args.preset}`\'s convolutions (stride 1, "same" padding), float32, '
        f"channels_last, batch {args.batch_size}; median of {args.rounds} alternating windows of "
        f"{args.calls} calls. oneDNN: its backward-weights primitive called directly (weight and bias "
        "gradients, the weight's reordered to the user's layout); BLAS products (ungrouped 1x1 "
        "kernels): `grad_y^T x` and `grad_y^T 1` over the channels_last pixels (views, no copy) in the "
        "BLAS torch calls, from Python; fasthvae: the two in one pass, `fasthvae::conv2d_weight_grad`; "
        "ATen: `aten.convolution_backward` for the weight and bias gradients. The last two rows sum "
        "each over the step's ungrouped 1x1 calls and over all its calls. Relative difference: the "
        "largest against the largest value."
    )
    title = f"Convolutions' weight gradients, {machine()}"
    print(write_report(rows, args.out / f"weight_gradients_{args.preset}", header, cells, title, intro))


if __name__ == "__main__":
    main()
