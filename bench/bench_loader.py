"""Images/s of each loader for full CIFAR-10 epochs with random flips, in one process.

The baseline is ``torch.utils.data.DataLoader`` with ``--workers`` workers and torchvision transforms
(what most training scripts use). Each loader runs one warm-up epoch, then ``--epochs`` timed epochs
of batches with random flips, in channels_last as the trainer takes them (``--no-channels-last``:
contiguous); the median epoch gives images/s. Writes ``loader_<device>.{csv,md}``.

``--feed MODEL[:PRESET] ...``: instead, the two array loaders (``torch``, ``resident``) feeding the
trainer's step (compile, ``--amp``, channels_last and the fused AdamW: the fasthvae path with the
loader fixed) of each model, at ``--batch-size``. Both trainers live in one process; ``--rounds``
rounds time one window of ``--steps`` steps of each, the order alternating, each window on its own
iteration of its loader after untimed steps that draw the batches a DataLoader keeps in flight (as
``bench_train``'s). The ratio is the median over rounds of each window against the first loader's
(the DataLoader's by default) of the same round. ``--feed-loaders resident resident`` (or ``torch
torch``) is the protocol's A/A run: its spread. Writes ``loader_feed_<device>_b<batch>.{csv,md}``.

    python -m bench.bench_loader [--data ../shared/data/cifar10/cifar10.npz] [--device cpu|cuda]
    python -m bench.bench_loader --feed vae hvae deep:small --batch-size 128 [--rounds 16]
                                 [--feed-loaders resident resident]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_train import Variant, paired
from bench.report import write_report
from fasthvae.data import LOADERS, LoaderOptions, load_dataset, make_loader
from fasthvae.data.dali import dali_available
from fasthvae.hardware import machine
from fasthvae.train import TrainConfig

FEED_LOADERS = ["torch", "resident"]
# The fasthvae path's switches with the loader fixed (no probe).
FASTHVAE_PATH = {"compile": True, "amp": True, "channels_last": True, "fused_optimizer": True}


def time_epochs(loader, epochs: int, device: torch.device) -> list[float]:
    """Seconds per epoch, each epoch consumed to the last batch (synchronized on CUDA)."""
    times = []
    for epoch in range(epochs + 1):  # epoch 0 warms up (workers, DALI pipeline build, caches)
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for _batch in loader:
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            times.append(time.perf_counter() - start)
    return times


def feed_rows(spec: str, args: argparse.Namespace) -> list[dict]:
    """``args.feed_loaders`` feeding the fasthvae step of ``spec`` (``model[:preset]``), paired rounds;
    the first is the reference. A loader named twice is an A/A run (its second trainer is ``name 2``)."""
    model, _, preset = spec.partition(":")
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.feed_loaders):
            config = TrainConfig(
                model=model,
                preset=preset or "small",
                batch_size=args.batch_size,
                device=args.device,
                data=args.data,
                loader=name,
                workers=args.workers,
                epochs=1,
                keep_freed_memory=False,
                out=f"{tmp}/{i}",
                speed="fixed",
                **FASTHVAE_PATH,
            )
            label = f"{name} 2" if name in args.feed_loaders[:i] else name
            built.append(Variant(label, config, fused_ops=True, warmup=args.warmup, bare=False))
        for r in range(args.rounds):
            for variant in built[r % 2 :] + built[: r % 2]:
                variant.time_window(args.steps)
    base = built[0]
    rows = []
    for variant in built:
        speedup, faster = paired(variant.windows, base.windows)
        rows.append(
            {
                "model": spec,
                "batch_size": args.batch_size,
                "loader": variant.name,
                "step_ms_median": round(1000 * statistics.median(variant.windows) / args.steps, 2),
                "time_vs_first": round(1 / speedup, 3),
                "faster_rounds": faster,
                "windows_ms": " ".join(f"{1000 * t / args.steps:.1f}" for t in variant.windows),
            }
        )
        print(rows[-1], flush=True)
    return rows


def feed(args: argparse.Namespace) -> None:
    rows = [row for spec in args.feed for row in feed_rows(spec, args)]
    print(
        write_report(
            rows,
            args.out / f"loader_feed_{args.device}_b{args.batch_size}",
            ["model", "batch", "loader", "step ms (median)", f"time vs {args.feed_loaders[0]} (faster in)"],
            lambda r: [
                r["model"],
                str(r["batch_size"]),
                r["loader"],
                str(r["step_ms_median"]),
                f"{r['time_vs_first']}x ({r['faster_rounds']}/{args.rounds})",
            ],
            title=f"The loaders feeding the fasthvae step, {machine()}",
            intro=f"{args.rounds} rounds, each one window of {args.steps} steps per loader, the order "
            "alternating; both trainers in one process, compile, --amp, channels_last and the fused "
            "AdamW, each window on its own loader iteration after the batches a DataLoader keeps in "
            "flight. The time ratio is the median over rounds of each window against the first "
            "loader's of the same round.",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=None, help="CIFAR-10 .npz or folder (default: $FASTHVAE_DATA or ./data)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="epochs: batches in channels_last, as the trainer takes them by default (--feed always is)",
    )
    parser.add_argument(
        "--feed", nargs="+", metavar="MODEL[:PRESET]", help="time the loaders feeding these models' steps"
    )
    parser.add_argument(
        "--feed-loaders",
        nargs=2,
        default=FEED_LOADERS,
        choices=FEED_LOADERS,
        help="--feed: the two loaders, the first the reference (one named twice: an A/A run)",
    )
    parser.add_argument("--rounds", type=int, default=16, help="--feed: windows of each loader")
    parser.add_argument("--steps", type=int, default=10, help="--feed: steps in a window")
    parser.add_argument("--warmup", type=int, default=3, help="--feed: untimed steps (compiles)")
    args = parser.parse_args()
    if args.feed:
        feed(args)
        return

    device = torch.device(args.device)
    images = load_dataset(args.data).train.images
    options = LoaderOptions(batch_size=args.batch_size, flip=True, seed=0, channels_last=args.channels_last)
    rows = []
    for name in ("torch", *[n for n in LOADERS if n != "torch"]):
        if name == "dali" and not dali_available():
            print("dali: skipped (nvidia-dali-cuda130 not installed)")
            continue
        loader = make_loader(name, images, options, device, num_workers=args.workers)
        times = time_epochs(loader, args.epochs, device)
        median = statistics.median(times)
        rows.append(
            {
                "loader": name,
                "device": device.type,
                "images": len(images),
                "batch_size": args.batch_size,
                "layout": "channels_last" if args.channels_last else "contiguous",
                "epoch_s_median": round(median, 4),
                "images_per_s": round(len(images) / median),
            }
        )
        print(rows[-1])
        del loader
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_torch"] = round(row["images_per_s"] / base, 2)

    header = ["loader", "device", "epoch s (median)", "images/s", "us / batch", "vs torch DataLoader"]
    print(
        write_report(
            rows,
            args.out / f"loader_{device.type}",
            header,
            lambda r: [
                r["loader"],
                r["device"],
                str(r["epoch_s_median"]),
                f"{r['images_per_s']:,}",
                f"{1e6 * args.batch_size / r['images_per_s']:.0f}",
                f"{r['speedup_vs_torch']}x",
            ],
            title=f"Loaders, batch {args.batch_size}, random flips, {rows[0]['layout']}, {machine()}",
            intro=f"{len(images):,} training images; the median of {args.epochs} epochs after a warm-up one.",
        )
    )


if __name__ == "__main__":
    main()
