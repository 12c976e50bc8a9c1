"""Train the study's VAE or two-level HVAE, or the deep top-down HVAE, on CIFAR-10.

    python -m fasthvae.train --amp                       # HVAE, alpha-beta schedule, 100 epochs
    python -m fasthvae.train --model vae --schedule beta --epochs 30 --data cifar10.npz
    python -m fasthvae.train --model deep --preset small # deep HVAE, mixture likelihood, plain ELBO
    torchrun --nproc_per_node 2 -m fasthvae.train ...    # DDP: each rank its shard, rank 0 writes

Leaves in --out: config.json, metrics.csv, checkpoint.pt (atomic, every epoch, on SIGTERM/SIGINT
and every --checkpoint-every minutes; --resume continues from it, mid-epoch too), samples.png,
reconstructions.png, loss_curves.png, latent_health.png, skips.jsonl (when steps were skipped),
TensorBoard events and summary.json. A run stopped by a signal exits with status 75.
"""

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from fasthvae.data import (
    DataError,
    Dataset,
    FileSplit,
    ImageSplit,
    LoaderOptions,
    image_batches,
    load_dataset,
    make_loader,
)
from fasthvae.data.sources import DATA_ENV
from fasthvae.eval.fid import FidError, model_fid
from fasthvae.eval.metrics import evaluate_model
from fasthvae.schedules import Schedule
from fasthvae.training import artifacts, forensics, latent_health
from fasthvae.training.checkpoint import CheckpointError, load_checkpoint, write_text_atomic
from fasthvae.training.config import (
    TrainConfig,
    TrainingError,
    build_parser,
    changed_from_defaults,
    given_options,
    merge_resumed,
    parse_args,
    validate,
    with_model_defaults,
)
from fasthvae.training.distributed import DistInfo, barrier, init_distributed, shutdown
from fasthvae.training.loop import EpochRun, Objective, StopRequest, build_stepper
from fasthvae.training.preemption import PREEMPTED_EXIT, Preempted, StopPolicy, StopSignals
from fasthvae.training.runtime import Runtime, device_type, resolve_runtime
from fasthvae.training.speed import choose_speed
from fasthvae.training.state import build_state

__all__ = ["Objective", "TrainConfig", "Trainer", "TrainingError", "main", "parse_args"]

HEALTH_IMAGES = 256  # test images on which each epoch counts active units


def resolve_config(
    config: TrainConfig, given: set[str] | None, checkpoint: Path
) -> tuple[TrainConfig, dict | None]:
    """The config a run trains with (the checkpoint's identity on --resume, the model's defaults,
    validated) and the checkpoint to restore (None for a new run)."""
    if config.data is None and os.environ.get(DATA_ENV):  # record where the data came from
        config = replace(config, data=os.environ[DATA_ENV])
    saved = None
    if config.resume:
        saved = load_checkpoint(checkpoint)
        given = changed_from_defaults(config) if given is None else given
        config = merge_resumed(config, saved, given)
    elif checkpoint.exists() and not config.overwrite:
        raise TrainingError(
            f"{checkpoint.parent} already holds a checkpoint: pass --resume to continue it, "
            "--overwrite to start afresh, or another --out"
        )
    config = with_model_defaults(config)
    validate(config)
    return config, saved


def seed_and_tune(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def drops_last_batch(dist: DistInfo, device: torch.device) -> bool:
    """Whether every epoch drops its last partial batch: with DDP (every rank takes as many steps)
    and on CUDA, where one odd shape a epoch would recompile the step and re-benchmark cuDNN."""
    return dist.enabled or device.type == "cuda"


class RunData:
    """The run's splits, its training loader, and the fixed test batches of the PNGs and the latent
    health check."""

    def __init__(self, config: TrainConfig, rt: Runtime, dist: DistInfo, data: Dataset) -> None:
        self.train = data.train.limit(config.limit_train)
        self.test = data.test.limit(config.limit_test)
        self.source = data.source
        options = LoaderOptions(
            batch_size=config.batch_size,
            flip=config.flip,
            seed=config.seed,
            drop_last=drops_last_batch(dist, rt.device),
            rank=dist.rank,
            world_size=dist.world_size,
            channels_last=rt.channels_last,
        )
        images = self.train if isinstance(self.train, FileSplit) else self.train.images
        self.loader = make_loader(rt.loader, images, options, rt.device, num_workers=config.workers)
        if len(self.loader) == 0:
            raise TrainingError(
                f"{len(self.train)} training images give no batch of {config.batch_size}"
                f" on {dist.world_size} process(es)"
            )
        self.fixed_batch = next(image_batches(self.test.images[:32], rt.device, 32))
        health = self.test.images[:HEALTH_IMAGES]
        self.health_batch = next(image_batches(health, rt.device, len(health)))


class Trainer:
    """Sets a run up from its config and ``run()``s it: epochs, checkpoints, outputs, summary."""

    def __init__(self, config: TrainConfig, given: set[str] | None = None) -> None:
        """``given``: the fields set explicitly (default: those that differ from the defaults)."""
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.config, saved = resolve_config(config, given, self.checkpoint_path)
        self.dist = init_distributed(device_type(self.config))  # NCCL on GPUs, gloo on CPU
        rt = resolve_runtime(self.config, self.dist)
        seed_and_tune(self.config.seed + self.dist.rank, rt.device)
        # An image folder with --loader dali stays on disk: DALI decodes the training images as it
        # reads them (for folders larger than memory).
        data = load_dataset(self.config.data, root=self.config.data_root, decode_train=rt.loader != "dali")
        train = data.train.limit(self.config.limit_train)
        images = train if isinstance(train, FileSplit) else train.images
        self.rt, self.speed = choose_speed(self.config, rt, self.dist, self._planned_steps(train), images)
        self.data = RunData(self.config, self.rt, self.dist, data)
        self.loader = self.data.loader
        self.state = build_state(self.config, self.rt)
        if saved is not None:
            self.state.restore(saved, self.dist.rank, self.checkpoint_path)
        self.schedule = Schedule(
            self.config.schedule, self.config.schedule_epochs or self.config.epochs, self.config.kl_warmup
        )
        self.step_fn = build_stepper(self.state, self.config, self.rt, self.dist)
        self.skips = forensics.SkipLog(self.out / "skips.jsonl" if self.dist.is_main else None)

    def _planned_steps(self, train: ImageSplit | FileSplit) -> int:
        """The optimizer steps of the whole run (at most: a time limit may stop it sooner)."""
        return self.config.epochs * math.ceil(len(train) / (self.config.batch_size * self.dist.world_size))

    # The state's parts, for code that drives a Trainer (tests, benchmarks, the study).
    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def ema(self):
        return self.state.ema

    @property
    def eval_model(self) -> nn.Module:
        return self.state.eval_model

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def history(self) -> list[dict]:
        return self.state.history

    def _save(self) -> None:
        self.state.save(self.config, self.dist, self.checkpoint_path)

    def _run_epoch(self, policy: StopPolicy, tb: artifacts.TensorBoardLog | None) -> dict | StopRequest:
        def save() -> None:
            self._save()
            policy.saved()

        return EpochRun(
            self.state,
            self.step_fn,
            self.loader,
            self.schedule,
            self.config,
            self.dist,
            self.skips,
            self.rt.log_every,
            poll=policy.poll,
            save=save,
            on_step=tb.step if tb is not None else None,
        ).run()

    def _check_latents(self, row: dict) -> None:
        """Into the epoch's row: the test -ELBO when asked, active units per latent group; warnings
        when groups collapse or one carries most of the KL (rank 0, first test images, evaluation
        weights)."""
        if self.config.test_every_epoch:
            images = self.data.test.images[: self.config.test_every_epoch]
            test = evaluate_model(
                self.eval_model, image_batches(images, self.rt.device, 500), autocast_dtype=self.rt.amp_dtype
            )
            row["test_neg_elbo"] = test["neg_elbo"]
            if "neg_elbo_bits_per_dim" in test:
                row["test_bits_per_dim"] = test["neg_elbo_bits_per_dim"]
        health = latent_health.measure(self.eval_model, self.data.health_batch, self.rt.amp_dtype)
        row.update({f"active_{name.removeprefix('kl_')}": h["active"] for name, h in health.items()})
        for warning in self.state.health.add(health):
            print(f"fasthvae.train: warning: epoch {self.epoch + 1}: {warning}", file=sys.stderr, flush=True)

    def _write_outputs(self, row: dict, tb: artifacts.TensorBoardLog | None) -> None:
        """metrics.csv, the PNGs and the epoch's TensorBoard images (rank 0)."""
        artifacts.write_metrics(self.history, self.out / "metrics.csv")
        samples, recons = artifacts.model_pictures(self.eval_model, self.data.fixed_batch, self.rt.amp_dtype)
        artifacts.write_pictures(
            self.out, self.history, self.state.health.history, samples, self.data.fixed_batch, recons
        )
        if tb is not None:
            tb.epoch(self.state.step, row, samples, recons)

    def _out_of_time(self) -> bool:
        """Whether another epoch, as long as the last one, would pass ``--time-limit``."""
        if self.config.time_limit is None or not self.history or self.state.progress.batch:
            return False
        spent = sum(r["seconds"] for r in self.history)
        return spent + self.history[-1]["seconds"] > self.config.time_limit * 60

    def summarize(self) -> dict:
        """Test-set measures of the final model, training speed, and FID when asked (rank 0)."""
        start = time.perf_counter()
        metrics = evaluate_model(
            self.eval_model,
            image_batches(self.data.test.images, self.rt.device, 500),
            iw_samples=self.config.iw_samples,
            autocast_dtype=self.rt.amp_dtype,
        )
        if self.config.fid_samples:
            fid = model_fid(
                self.eval_model,
                self.config.fid_samples,
                device=self.rt.device,
                data=self.config.data,
                data_root=self.config.data_root,
                weights=self.config.fid_weights,
                extractor=self.config.fid_extractor,
            )
        summary = {
            "test": metrics,
            "epochs": self.epoch,
            "steps": self.state.step,
            "train_images": len(self.data.train),
            "data": self.data.source,
            "images_per_s_last_epoch": self.history[-1]["images_per_s"] if self.history else None,
            "train_seconds": sum(r["seconds"] for r in self.history),
            "eval_seconds": time.perf_counter() - start,
            "skipped_steps": sum(r["skipped_steps"] for r in self.history),
            "stopped_by_time_limit": self.epoch < self.config.epochs,
            "evaluated_weights": f"EMA (rate {self.config.ema})" if self.ema else "trained",
            "latent_health": self.state.health.summary(),
            "runtime": self.runtime_record(),
        }
        if self.config.fid_samples:
            summary["fid"] = fid
        return summary

    def runtime_record(self) -> dict:
        """What this process resolved (device, precision, the speed switches and how they were
        chosen, loader), for config and summary."""
        record = self.rt.record(self.dist.world_size) | {"speed": self.speed}
        if self.step_fn.compile_failure:  # compilation was the default and failed: trained eager
            record |= {"compile": False, "compile_failed": self.step_fn.compile_failure}
        return record

    def run(self, on_epoch: Callable[[dict], None] | None = None) -> dict:
        """Train to ``config.epochs``, then summarize; ``on_epoch(row)`` after each epoch (rank 0).
        Raises :class:`Preempted` after saving when SIGTERM or SIGINT arrives."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".checkpoint.pt.*.tmp"):  # left by a process killed mid-save
                stale.unlink(missing_ok=True)
            self._write_config()
        tb = None
        if self.rt.tensorboard and self.dist.is_main:
            skipped = sum(r["skipped_steps"] for r in self.history)
            tb = artifacts.TensorBoardLog(self.out, self.state.step, skipped)
        try:
            with StopSignals() as signals:
                policy = StopPolicy(signals, self.config.checkpoint_every, self.dist, self.rt.device)
                self._train(policy, tb, on_epoch)
        finally:
            if tb is not None:
                tb.close()
        # Rank 0 alone evaluates (FID and the IW bound can take long); the other ranks wait for it in
        # distributed.shutdown, on a group whose timeout outlasts any evaluation.
        summary = {}
        if self.dist.is_main:
            summary = self.summarize()
            write_text_atomic(json.dumps(summary, indent=2) + "\n", self.out / "summary.json")
        return summary

    def _write_config(self) -> None:
        record = asdict(self.config) | {"runtime": self.runtime_record()}
        write_text_atomic(json.dumps(record, indent=2) + "\n", self.out / "config.json")

    def _train(
        self, policy: StopPolicy, tb: artifacts.TensorBoardLog | None, on_epoch: Callable[[dict], None] | None
    ) -> None:
        while self.epoch < self.config.epochs and not self._out_of_time():
            row = self._run_epoch(policy, tb)
            if isinstance(row, StopRequest):
                raise Preempted(
                    policy.signal_name(), self.epoch, row.batch, self.state.step, str(self.checkpoint_path)
                )
            if self.dist.is_main:
                self._check_latents(row)
            self.state.epoch += 1
            self.history.append(row)
            if self.dist.is_main:
                print(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
                summary = self.skips.end_epoch()
                if summary:
                    print(f"fasthvae.train: epoch {self.epoch}: {summary}", file=sys.stderr, flush=True)
                self._write_outputs(row, tb)
                if self.step_fn.compile_failure:  # the runtime changed after config.json was written
                    self._write_config()
            self._save()
            policy.saved()
            if on_epoch is not None and self.dist.is_main:
                on_epoch(row)
            barrier(self.dist)
            if policy.poll()[1]:  # a signal during the epoch's last step or its outputs
                raise Preempted(
                    policy.signal_name(), self.epoch, 0, self.state.step, str(self.checkpoint_path)
                )


def main(argv: list[str] | None = None) -> int:
    config = TrainConfig(**vars(build_parser(description=__doc__).parse_args(argv)))
    trainer = None
    try:
        trainer = Trainer(config, given_options(argv))
        summary = trainer.run()
    except Preempted as stop:
        print(f"fasthvae.train: {stop}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except (TrainingError, CheckpointError, DataError, FidError) as err:
        print(f"fasthvae.train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            shutdown(trainer.dist)
    if summary:
        print(json.dumps(summary["test"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
