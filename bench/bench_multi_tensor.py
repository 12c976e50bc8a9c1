"""The optimizer step and its bookkeeping on a model's parameter list: torch's foreach ops and fused
AdamW eager, torch.compile'd, and fasthvae's multi-tensor ops and AdamW, in one process.

For a model of the study (``--model``, ``--preset``; its parameters as the trainer lays them out,
channels_last with ``--channels-last``) it times each op on the whole list: the per-tensor norms,
the in-place scaling (a factor of 0.999: a clipped step), the EMA update, the three as the
trainer's step runs them (norms, the total norm and its clip factor, scaling, EMA), and an AdamW
step (eager: torch's fused AdamW; compiled: its foreach AdamW's ``step`` under torch.compile;
fasthvae: ``fasthvae.optim.AdamW``). Rounds alternate
the implementations in a rotated order; medians of the rounds. Reports ms, the speed-ups over eager
and compiled, and the bytes each op must move against the machine's copy bandwidth measured in the
same run (a copy of the same number of float32 elements: read + write). Writes
``multi_tensor_<model>.{csv,md}``.

    python -m bench.bench_multi_tensor [--model deep] [--preset small] [--rounds 30] [--no-compile]
"""

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.report import write_report
from fasthvae import ops
from fasthvae.hardware import machine
from fasthvae.models import build_model
from fasthvae.ops import reference
from fasthvae.optim import AdamW

IMPLS = ("eager", "compiled", "fasthvae")


def bookkeeping(norms: Callable, scale: Callable, ema: Callable) -> Callable:
    """The step's bookkeeping with one implementation of the three ops (Stepper and EMA.update)."""

    def run(grads, averages, params, weight):
        per_tensor = norms(grads)
        total = torch.linalg.vector_norm(per_tensor)
        scale(grads, torch.clamp(1.0 / (total + 1e-6), max=1.0))
        ema(averages, params, weight)

    return run


def cases(grads, averages, params, compile: bool) -> dict[str, tuple[dict[str, Callable], tuple, int]]:
    """name -> (implementation -> fn, arguments, float32 elements moved per element of the list)."""
    factor, weight = torch.tensor(0.999), torch.tensor(1e-3)  # 0.999: stays normal over the rounds
    plain = {
        "norms": reference.multi_tensor_norms,
        "scale": reference.multi_tensor_scale_,
        "ema": reference.multi_tensor_ema_,
    }
    fused = {"norms": ops.multi_tensor_norms, "scale": ops.multi_tensor_scale_, "ema": ops.multi_tensor_ema_}
    args = {"norms": (grads,), "scale": (grads, factor), "ema": (averages, params, weight)}
    moved = {"norms": 1, "scale": 2, "ema": 3}
    out = {}
    for name in plain:
        fns = {"eager": plain[name], "fasthvae": fused[name]}
        if compile:
            fns["compiled"] = torch.compile(plain[name], dynamic=False)
        out[name] = (fns, args[name], moved[name])
    step = {"eager": bookkeeping(*plain.values()), "fasthvae": bookkeeping(*fused.values())}
    if compile:
        step["compiled"] = torch.compile(step["eager"], dynamic=False)
    # norms, and the scaling only when clipped (a factor of 1 here: no pass), then the EMA
    out["step"] = (step, (grads, averages, params, weight), 4)
    adamw = {"eager": adamw_step(torch.optim.AdamW, params, grads, fused=True)}
    if compile:
        adamw["compiled"] = torch.compile(adamw_step(torch.optim.AdamW, params, grads, foreach=True))
    adamw["fasthvae"] = adamw_step(AdamW, params, grads, fused=True)
    # parameters, moments read and written, gradients read
    out["adamw"] = (adamw, (), 7)
    return out


def adamw_step(optimizer: type, params: list[torch.Tensor], grads: list[torch.Tensor], **kwargs) -> Callable:
    """``step`` of an AdamW over copies of ``params`` with ``grads`` (each optimizer its own copies)."""
    copies = [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format)) for p in params]
    for p, g in zip(copies, grads, strict=True):
        p.grad = g.clone(memory_format=torch.preserve_format)
    return optimizer(copies, lr=1e-4, **kwargs).step


def timed(fn: Callable, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deep", choices=["vae", "hvae", "deep"])
    parser.add_argument("--preset", default="small", help="the deep model's preset")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows (quicker)")
    parser.add_argument("--calls", type=int, default=10, help="calls per timed window")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    kwargs = {"spec": args.preset} if args.model == "deep" else {}
    model = build_model(args.model, **kwargs)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    averages = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
    elements = sum(p.numel() for p in params)
    copy_src, copy_dst = torch.randn(elements), torch.empty(elements)
    name = args.model + (f"_{args.preset}" if args.model == "deep" else "")
    print(f"{name}: {len(params)} tensors, {elements:,} elements; {machine()}", flush=True)

    rows = []
    with torch.no_grad():
        for case, (fns, fn_args, moved) in cases(grads, averages, params, not args.no_compile).items():
            for fn in fns.values():  # warm-up and compile
                for _ in range(3):
                    fn(*fn_args)
            impls = [k for k in IMPLS if k in fns]
            times: dict[str, list[float]] = {k: [] for k in (*impls, "copy")}
            order = [*impls, "copy"]
            for r in range(args.rounds):
                for impl in order[r % len(order) :] + order[: r % len(order)]:
                    if impl == "copy":
                        times[impl].append(timed(copy_dst.copy_, (copy_src,), args.calls))
                    else:
                        times[impl].append(timed(fns[impl], fn_args, args.calls))
            copy_gbs = 2 * 4 * elements / statistics.median(times["copy"]) / 1e9
            medians = {k: statistics.median(v) for k, v in times.items()}
            compiled = medians.get("compiled")
            for impl in impls:
                seconds = medians[impl]
                gbs = moved * 4 * elements / seconds / 1e9
                rows.append({
                    "model": name, "op": case, "impl": impl, "tensors": len(params), "elements": elements,
                    "median_ms": round(seconds * 1e3, 3),
                    "speedup_vs_eager": round(medians["eager"] / seconds, 2),
                    "speedup_vs_compiled": round(compiled / seconds, 2) if compiled else "",
                    "GB_per_s": round(gbs, 2), "copy_GB_per_s": round(copy_gbs, 2),
                    "share_of_copy": round(gbs / copy_gbs, 3),
                })  # fmt: skip
                print(" | ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)

    header = ["op", "impl", "median ms", "x eager", "x compiled", "GB/s", "of the copy bandwidth"]

    def cells(r: dict) -> list[str]:
        share = f"{100 * r['share_of_copy']:.0f}%"
        return [r["op"], r["impl"], str(r["median_ms"]), str(r["speedup_vs_eager"]),
                str(r["speedup_vs_compiled"]), str(r["GB_per_s"]), share]  # fmt: skip

    intro = (
        f"{name}: {len(params)} parameter tensors, {elements:,} elements, "
        f"{'channels_last' if args.channels_last else 'contiguous'}; {machine()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. AdamW: eager is torch's fused AdamW, "
        f"compiled its foreach AdamW's step under torch.compile. Medians of {args.rounds} rounds of "
        f"{args.calls} calls, the implementations alternating. Bytes: float32 elements read and "
        "written (norms 1, scale 2, EMA 3, the step 4, AdamW 7 per element; the step's scaling has a "
        "factor of 1 and makes no pass); the copy bandwidth is a copy of as many float32 elements, "
        "measured in the same rounds (its source and destination are twice the list's memory: an "
        "in-place pass over a list that fits the caches can beat it)."
    )
    stem = args.out / f"multi_tensor_{name}"
    write_report(rows, stem, header, cells, "bench_multi_tensor", intro)
    print(f"wrote {stem}.csv and .md")


if __name__ == "__main__":
    main()
