"""The training loop: one optimizer step, and one epoch (resumable mid-way) of them.

The step never reads a value back to the host when the optimizer can take its skip decision as a
device flag (the fused AdamW's ``found_inf``, as GradScaler uses it): the gradient norm, the skip
threshold, the decision, the EMA update, the epoch's sums and each step's record stay on the
device, and the records are read back once every ``log_every`` steps (progress bar, TensorBoard,
skip forensics, signals, periodic checkpoints). With the unfused AdamW (`--no-fused-optimizer`)
the step reads its decision back.
"""

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._inductor.exc import InductorError
from tqdm import tqdm

from fasthvae import ops
from fasthvae.data import BatchLoader
from fasthvae.ops.compiled_cpu import cpu_twins_pass
from fasthvae.schedules import Schedule, lr_factor
from fasthvae.training import forensics
from fasthvae.training.config import TrainConfig, TrainingError
from fasthvae.training.distributed import DistInfo, all_reduce_sum
from fasthvae.training.precision import autocast
from fasthvae.training.runtime import Runtime
from fasthvae.training.state import EpochProgress, TrainState

# What a failed compilation raises (Inductor's error is Dynamo's backend failure in newer torch).
COMPILE_ERRORS = (BackendCompilerFailed, InductorError)


def error_line(err: BaseException) -> str:
    """An error in one line: its type and first line, a compiler's with the error inside it."""
    inner = getattr(err, "inner_exception", None)
    cause = f"{type(inner).__name__}: {inner}" if inner is not None else str(err)
    lines = cause.strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class Objective(nn.Module):
    """``model.loss`` as a module, so DDP sees the forward pass and torch.compile takes it whole."""

    def __init__(self, model: nn.Module, free_bits: float = 0.0) -> None:
        super().__init__()
        self.model, self.free_bits = model, free_bits

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, balance: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        return self.model.loss(x, weights, self.free_bits, balance)


@dataclass
class StepResult:
    """One step, on the device: ``row`` holds the terms (``Stepper.terms`` order), the gradient
    norm, the skip threshold, whether the step was taken, whether it undid the last one taken
    (``--skip-rewind``), the loss scale (NaN: no scaler), then the gradient norm of each parameter in
    ``params`` (indices into ``Stepper.param_names``)."""

    row: torch.Tensor
    taken: torch.Tensor
    params: tuple[int, ...]


class Stepper:
    """Takes (or skips) one optimizer step of ``objective`` on a batch. Skipped: a non-finite loss
    or gradient norm, or a norm above the adaptive threshold. Gradients are all-reduced under DDP,
    so every rank sees the same norm and decides alike."""

    def __init__(
        self,
        state: TrainState,
        objective: nn.Module,
        config: TrainConfig,
        rt: Runtime,
        sync_free: bool,
        eager: nn.Module | None = None,
    ) -> None:
        self.state, self.objective, self.rt, self.sync_free = state, objective, rt, sync_free
        # ``eager``: the objective uncompiled, taken instead when the compiled one fails to compile
        # on the first step (compilation is a default, not asked for); ``compile_failure`` says why.
        self.eager, self.compile_failure = eager, None
        self.max_norm = config.grad_clip or math.inf
        self.terms = ["loss", "recon", *state.model.kl_levels]
        named = list(state.model.named_parameters())
        self.param_names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.no_scale = torch.tensor([math.nan], device=rt.device)
        self.no_rewind = torch.tensor(False, device=rt.device)

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, balance: torch.Tensor | None = None
    ) -> StepResult:
        """One step at the KL ``weights`` of each level and, with ``--kl-balance``, the balancing's
        strength ``balance`` (see ``LatentVariableModel.loss``)."""
        if self.eager is None:
            return self._step(x, weights, balance)
        try:  # the first step compiles; a failure comes before the optimizer's update
            result = self._step(x, weights, balance)
        except COMPILE_ERRORS as err:
            self.compile_failure = error_line(err)
            print(
                f"fasthvae.train: the step failed to compile ({self.compile_failure}); "
                "training without torch.compile (--compile makes this an error)",
                file=sys.stderr,
                flush=True,
            )
            self.objective = self.eager
            result = self._step(x, weights, balance)
        self.eager = None
        return result

    def _step(self, x: torch.Tensor, weights: torch.Tensor, balance: torch.Tensor | None) -> StepResult:
        s = self.state
        with autocast(self.rt.device.type, self.rt.amp_dtype):
            terms = self.objective(x, weights, balance)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(terms["loss"]).backward()
        s.scaler.unscale_(s.optimizer)
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        grads = [self.params[i].grad for i in present]
        param_norms = ops.multi_tensor_norms(grads)
        norm = torch.linalg.vector_norm(param_norms)
        if math.isfinite(self.max_norm):  # as clip_grad_norm_
            ops.multi_tensor_scale_(grads, torch.clamp(self.max_norm / (norm + 1e-6), max=1.0))
        threshold = s.skip.threshold_tensor().float() if s.skip else torch.full_like(norm, math.inf)
        taken, rewind = s.skip.decide_tensor(norm) if s.skip else (torch.isfinite(norm), self.no_rewind)
        scale = s.scaler._get_scale_async().view(1).float() if s.scaler.is_enabled() else self.no_scale
        if s.rewind is not None:
            s.rewind.keep(taken if self.sync_free else bool(taken))
        if self.sync_free:
            s.optimizer.found_inf = (~taken).float()  # the fused AdamW leaves everything as it was
            s.optimizer.step()
        elif bool(taken):
            s.scaler.step(s.optimizer)
        if s.rewind is not None:
            s.rewind.restore(rewind if self.sync_free else bool(rewind))
        if s.ema is not None:
            s.ema.update(s.model, taken)
        s.scaler.update()
        values = torch.stack([terms[k].detach().float() for k in self.terms])
        head = torch.stack([norm, threshold, taken.float(), rewind.float()])
        return StepResult(torch.cat([values, head, scale, param_norms]), taken, present)

    def record(self, result: list[float], params: tuple[int, ...]) -> dict:
        """The host form of a result's row."""
        n = len(self.terms)
        scale = result[n + 4]
        return {
            "terms": dict(zip(self.terms, result[:n], strict=True)),
            "grad_norm": result[n],
            "threshold": result[n + 1],
            "taken": result[n + 2] == 1.0,
            "rewound": result[n + 3] == 1.0,
            "loss_scale": None if math.isnan(scale) else scale,
            "param_norms": {self.param_names[i]: v for i, v in zip(params, result[n + 5 :], strict=True)},
        }


def compile_options(mode: str, device: torch.device, wrapper: str = "python") -> dict[str, object]:
    """Inductor's options for the step: ``mode``'s, and on CUDA random ops drawn by ATen
    (``fallback_random``). Inductor otherwise draws the unfused step's noise inside its own kernels,
    and Triton 3.6 (torch 2.11) rejects the one it makes of the deep model's noise fused with its
    likelihood (``PassManager::run failed`` for sm_90); ATen draws it in a kernel of its own.
    ``wrapper`` "cpp": Inductor's C++ wrapper, without its checks of each op's output sizes and
    strides (the ops' fake kernels are checked against their real ones by opcheck in the tests),
    built as a unit apart from the kernels' (the wrapper at Inductor's low optimisation level, the
    kernels at full), so that the first compile takes a quarter to two fifths longer than the python
    wrapper's instead of three times as long, the step's gain kept; and without line tables (``-g1``),
    which change no instruction of the built code and took about 8% of its first compile. On CPU
    the graphs call the fused ops' C++ twins in place of their Python implementations
    (``ops.compiled_cpu``)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode, dynamic=False))
    if device.type == "cuda":
        options["fallback_random"] = True
    elif (twins := cpu_twins_pass()) is not None:
        options["post_grad_custom_post_pass"] = twins
    if wrapper == "cpp":
        options |= {
            "cpp_wrapper": True,
            "cpp_wrapper_build_separate": True,
            "size_asserts": False,
            "alignment_asserts": False,
            "aot_inductor.enable_line_tables": False,
        }
    return options


def build_stepper(
    state: TrainState, config: TrainConfig, rt: Runtime, dist: DistInfo, objective: nn.Module | None = None
) -> Stepper:
    """The step of ``state``'s model as ``rt`` runs it: wrapped in DDP under ``dist``, compiled when
    ``rt.compile``, with device-side skip decisions when the optimizer is fused. ``objective``: one
    built (and compiled) before for the same model and switches, taken as it is."""
    eager = None
    if objective is None:
        objective, eager = build_objective(state.model, config, rt, dist)
    # Skips decided on the device need the fused AdamW (its found_inf): then the step never waits.
    return Stepper(state, objective, config, rt, sync_free=rt.fused_optimizer, eager=eager)


def build_objective(
    model: nn.Module, config: TrainConfig, rt: Runtime, dist: DistInfo
) -> tuple[nn.Module, nn.Module | None]:
    """``model``'s objective, in DDP under ``dist``, compiled when ``rt.compile``; and the eager one
    to fall back on where compilation was not asked for (``None`` where it was, or is off: a failure
    to compile that was asked for is an error)."""
    objective: nn.Module = Objective(model, config.free_bits)
    if dist.enabled:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    if not rt.compile:
        return objective, None
    # dynamic=False: an epoch's last partial batch (kept on one CPU process) gets a static graph
    # of its own. Left to dynamo's automatic dynamic shapes, it would recompile the step with a
    # symbolic batch size, which every later full batch then runs (bench/bench_recompile.py).
    compiled = torch.compile(
        objective,
        dynamic=False,
        options=compile_options(config.compile_mode, rt.device, rt.compile_wrapper),
    )
    return compiled, objective if config.compile is None else None


@dataclass
class StopRequest:
    """The loop saved a mid-epoch checkpoint and must stop (a signal)."""

    batch: int


class EpochRun:
    """One epoch of steps from ``state.progress`` on; ``run()`` gives its metrics row, or a
    StopRequest once ``poll() -> (save, stop)`` says stop (after saving). Every ``log_every`` steps
    the records are read back: ``on_step(step, record, weights, images_per_s)`` (rank 0), skip
    forensics, the consecutive-skip limit, then ``poll``."""

    def __init__(
        self,
        state: TrainState,
        step: Stepper,
        loader: BatchLoader,
        schedule: Schedule,
        config: TrainConfig,
        dist: DistInfo,
        skips: forensics.SkipLog,
        log_every: int,
        poll: Callable[[], tuple[bool, bool]],
        save: Callable[[], None],
        on_step: Callable[[int, dict, list[float], float], None] | None = None,
    ) -> None:
        self.state, self.stepper, self.loader, self.schedule = state, step, loader, schedule
        self.config, self.dist, self.skips, self.log_every = config, dist, skips, log_every
        self.poll, self.save, self.on_step = poll, save, on_step
        self.pending: list[tuple[int, list[float], StepResult]] = []
        self.bar = None

    def run(self) -> dict | StopRequest:
        state, p = self.state, self.state.progress
        state.model.train()
        n_batches = len(self.loader)
        levels = state.model.num_levels
        device = next(state.model.parameters()).device
        n_terms = len(self.stepper.terms)
        if p.sums is None:
            p.sums = torch.zeros(n_terms + 2, dtype=torch.float64)  # + images, skips
        sums = p.sums.to(device)
        weights = [self.schedule.level_weights(state.epoch + i / n_batches, levels) for i in range(n_batches)]
        weights_table = torch.tensor(weights, device=device)  # one copy per epoch
        balance_table = None
        if self.config.kl_balance:  # full strength while the KL warm-up ramps, off after
            ramping = [self.schedule.warming_up(state.epoch + i / n_batches) for i in range(n_batches)]
            balance_table = torch.tensor(ramping, dtype=torch.float32, device=device)
        lr_name, total, warmup = self.config.lr_schedule, self.schedule.total_epochs, self.config.lr_warmup
        lrs = [
            self.config.lr * lr_factor(lr_name, state.epoch + i / n_batches, total, warmup)
            for i in range(n_batches)
        ]
        self.loader.set_epoch(state.epoch, start_batch=p.batch)
        self.start, self.first = time.perf_counter() - p.seconds, p.batch
        self.bar = tqdm(
            total=n_batches,
            initial=p.batch,
            desc=f"epoch {state.epoch + 1}/{self.config.epochs}",
            disable=not self.dist.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        for i, (x, _) in enumerate(self.loader, start=p.batch):
            for group in state.optimizer.param_groups:
                group["lr"] = lrs[i]
            result = self.stepper(x, weights_table[i], None if balance_table is None else balance_table[i])
            state.step += 1
            taken = result.taken
            sums[:n_terms] += torch.where(taken, result.row[:n_terms].double() * len(x), 0.0)
            sums[-2] += taken * len(x)
            sums[-1] += ~taken
            self.pending.append((state.step, weights[i], result))
            if len(self.pending) < self.log_every and i + 1 < n_batches:
                continue
            self._read_back(i + 1, len(x), n_batches)
            if i + 1 < n_batches:
                want_save, stop = self.poll()
                if want_save:
                    p.batch, p.sums, p.seconds = i + 1, sums.cpu(), time.perf_counter() - self.start
                    self.save()
                    if stop:
                        self.bar.close()
                        return StopRequest(batch=i + 1)
        self.bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        all_reduce_sum(sums, self.dist)
        state.progress = EpochProgress()
        return epoch_row(state, self.schedule, self.stepper.terms, sums, seconds)

    def _read_back(self, batches_done: int, batch_size: int, n_batches: int) -> None:
        """One host read of the pending steps' records; their bookkeeping."""
        results = [r for _, _, r in self.pending]
        flat = torch.cat([r.row for r in results]).tolist()
        elapsed = time.perf_counter() - self.start
        images_per_s = (batches_done - self.first) * batch_size * self.dist.world_size / max(elapsed, 1e-9)
        p, offset = self.state.progress, 0
        for step, weights, result in self.pending:
            record = self.stepper.record(flat[offset : offset + len(result.row)], result.params)
            offset += len(result.row)
            if self.on_step is not None and self.dist.is_main:
                self.on_step(step, record, weights, images_per_s)
            if record["taken"]:
                p.consecutive_skips = 0
                self.skips.took_step()
                continue
            p.consecutive_skips += 1
            why = forensics.diagnose(
                record["terms"],
                self.stepper.terms[1:],
                record["param_norms"],
                record["grad_norm"],
                record["threshold"] if self.state.skip else None,
                record["loss_scale"],
            )
            rewound = record["rewound"]
            self.skips.add(
                {"epoch": self.state.epoch + 1, "step": step, "weights": weights, **why, "rewound": rewound}
            )
            if p.consecutive_skips >= self.config.max_skips:
                raise TrainingError(too_many_skips(self.state, self.config, self.skips, step))
        self.pending = []
        self.bar.update(batches_done - self.bar.n)
        if self.dist.is_main:
            last = self.stepper.record(flat[-len(results[-1].row) :], results[-1].params)
            epochs_left = self.config.epochs - self.state.epoch - batches_done / n_batches
            elapsed_all = time.perf_counter() - self.start
            self.bar.set_postfix(
                loss=f"{last['terms']['loss']:.1f}",
                img_s=f"{images_per_s:.0f}",
                run_eta=_minutes(epochs_left * elapsed_all / (batches_done / n_batches)),
            )


def epoch_row(
    state: TrainState, schedule: Schedule, names: list[str], sums: torch.Tensor, seconds: float
) -> dict:
    """The epoch's line of metrics.csv: per-image means of the taken steps, weights, learning rate,
    speed, skips."""
    levels = state.model.num_levels
    images, skipped = float(sums[-2]), int(sums[-1])
    row: dict = {"epoch": state.epoch + 1}
    row.update({k: float(sums[j]) / max(images, 1) for j, k in enumerate(names)})
    weights = schedule.level_weights(state.epoch + 1, levels)
    row.update({"alpha": weights[-1], "beta": weights[0]})  # the finest and the top level
    if levels > 2:
        row.update({f"weight_level{level}": w for level, w in enumerate(weights)})
    row["lr"] = state.optimizer.param_groups[0]["lr"]  # the epoch's last step's
    row.update({"images_per_s": images / seconds, "seconds": seconds, "skipped_steps": skipped})
    return row


def too_many_skips(state: TrainState, config: TrainConfig, skips: forensics.SkipLog, step: int) -> str:
    threshold = f" (skip threshold now {state.skip.threshold():.4g})" if state.skip else ""
    return (
        f"{config.max_skips} consecutive skipped steps{threshold} at epoch {state.epoch + 1}, step "
        f"{step}: training stopped. Likely cause: {forensics.likely_cause(skips.recent)}. The last "
        f"good checkpoint (epoch {state.epoch}) is intact; skips.jsonl has every skipped step."
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 60 else f"{seconds:.0f}s"
