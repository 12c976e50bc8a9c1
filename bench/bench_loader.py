"""Images/s of each loader for full CIFAR-10 epochs with random flips, in one process.

The baseline is ``torch.utils.data.DataLoader`` with ``--workers`` workers and torchvision transforms
(what most training scripts use). Each loader runs one warm-up epoch, then ``--epochs`` timed epochs;
the median epoch gives images/s. Writes ``loader_<device>.{csv,md}``.

    python -m bench.bench_loader [--data ../shared/data/cifar10/cifar10.npz] [--device cpu|cuda]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.report import write_report
from fasthvae.data import LOADERS, LoaderOptions, load_dataset, make_loader
from fasthvae.data.dali import dali_available


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
    args = parser.parse_args()

    device = torch.device(args.device)
    images = load_dataset(args.data).train.images
    options = LoaderOptions(batch_size=args.batch_size, flip=True, seed=0)
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
                "epoch_s_median": round(median, 4),
                "images_per_s": round(len(images) / median),
            }
        )
        print(rows[-1])
        del loader
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_torch"] = round(row["images_per_s"] / base, 2)

    header = ["loader", "device", "epoch s (median)", "images/s", "vs torch DataLoader"]
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
                f"{r['speedup_vs_torch']}x",
            ],
        )
    )


if __name__ == "__main__":
    main()
