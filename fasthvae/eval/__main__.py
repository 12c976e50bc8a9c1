"""Evaluate a trained run: test reconstruction, KLs, ELBO, IW bound, bits/dim and FID.

    python -m fasthvae.eval RUN_DIR_OR_CHECKPOINT [--fid-samples 10000] [--fid-ref test|train]
        [--fid-weights PATH] [--temperature 1.0 [0.8 ...]] [--iw-samples K] [--batch-size N] [--seed S]

Prints a table and writes eval.json next to the checkpoint. Several --temperature values give an
FID-vs-temperature sweep. --seed fixes the random draws (the test pass's posterior samples, and
each temperature's samples, drawn afresh from the seed): on CPU the same seed gives the same
numbers (tested; GPU kernels need not be deterministic); other seeds show how far the figures move
with the draws. --fid-extractor
fasthvae-tiny runs the FID path with a tiny extractor (seconds; numbers not comparable with
Inception FIDs).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from fasthvae.data import DataError, image_batches, load_dataset
from fasthvae.eval.fid import FidError, fid_against, generate, reference_images
from fasthvae.eval.metrics import evaluate_model
from fasthvae.eval.runs import load_run
from fasthvae.training.checkpoint import CheckpointError, write_text_atomic
from fasthvae.training.config import add_options
from fasthvae.training.precision import choose_amp_dtype


def print_table(result: dict) -> None:
    rows = [(k, v) for k, v in result["test"].items()]
    for fid in result.get("fid", []):
        rows += [(f"fid (T={fid['temperature']:g}, n={fid['samples']})", fid["fid"])]
        rows += [(f"  {k}", fid[k]) for k in ("kid_mean", "precision", "recall") if k in fid]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:,.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fasthvae.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="a run folder (with checkpoint.pt) or a checkpoint file")
    # The options a training run has too, as TrainConfig declares them (10,000 FID samples here).
    add_options(
        p, ("fid_samples", "fid_extractor", "fid_weights", "iw_samples", "limit_test"), {"fid_samples": 10000}
    )
    p.add_argument("--fid-ref", choices=["test", "train"], default="test")
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    p.add_argument("--batch-size", type=int, default=500, help="images per evaluation batch")
    p.add_argument("--data", default=None, help="default: the data the run trained on")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for sampling and the test pass")
    p.add_argument("--seed", type=int, default=0, help="seeds the test pass and each temperature's samples")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        model, config, checkpoint = load_run(args.run, device)
        data = args.data or config["data"]
        test = load_dataset(data, root=config["data_root"]).test.limit(args.limit_test)
        amp_dtype, _ = choose_amp_dtype(args.amp, "bf16", device)
        torch.manual_seed(args.seed)
        metrics = evaluate_model(
            model,
            image_batches(test.images, device, args.batch_size),
            iw_samples=args.iw_samples,
            autocast_dtype=amp_dtype,
        )
    except (CheckpointError, DataError) as err:
        print(f"fasthvae.eval: error: {err}", file=sys.stderr)
        return 2
    result = {"checkpoint": str(checkpoint), "seed": args.seed, "test": metrics}
    out = checkpoint.parent / "eval.json"
    write_text_atomic(json.dumps(result, indent=2) + "\n", out)  # kept whatever happens to FID
    code = 0
    if args.fid_samples:
        result["fid"] = []
        try:
            reference, name = reference_images(args.fid_ref, data, config["data_root"])
            for temperature in args.temperature:
                torch.manual_seed(args.seed)
                samples = generate(model, args.fid_samples, temperature, args.batch_size, amp_dtype)
                fid = fid_against(
                    samples,
                    reference,
                    name,
                    extractor=args.fid_extractor,
                    weights=args.fid_weights,
                    device=device,
                )
                result["fid"].append({"temperature": temperature, **fid})
        except FidError as err:
            result["fid_error"] = str(err)
            print(f"fasthvae.eval: FID failed, the other metrics are in {out}: {err}", file=sys.stderr)
            code = 2
    print_table(result)
    write_text_atomic(json.dumps(result, indent=2) + "\n", out)
    return code


if __name__ == "__main__":
    sys.exit(main())
