"""Runs that survive preemption: SIGTERM (SLURM, Kubernetes) and SIGINT (Ctrl-C) ask the loop to
save a mid-epoch checkpoint and stop after the current step; ``--checkpoint-every`` saves one on a
clock. Under DDP the ranks agree on both after every step, so all stop (and save) at the same step.
"""

import signal
import threading
import time

import torch

from fasthvae.training.distributed import DistInfo

# The exit status of a run stopped by a signal after saving (sysexits' EX_TEMPFAIL: "try again"),
# distinct from success (0), errors (1) and bad arguments or diverged runs (2).
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """The run saved a mid-epoch checkpoint and stopped on a signal; ``--resume`` continues it."""

    def __init__(self, signal_name: str, epoch: int, batch: int, step: int, checkpoint: str) -> None:
        where = f"in epoch {epoch + 1} after batch {batch}" if batch else f"after epoch {epoch}"
        super().__init__(
            f"stopped by {signal_name} {where} (step {step}); the checkpoint {checkpoint} holds it: "
            "rerun with --resume to continue exactly there"
        )
        self.signal_name = signal_name


class StopSignals:
    """While entered, SIGTERM and SIGINT set ``received`` instead of killing the process; a second
    SIGINT (an impatient Ctrl-C) interrupts at once. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class StopPolicy:
    """After each step: whether to save a mid-epoch checkpoint, and whether to stop after it."""

    def __init__(self, signals: StopSignals, every_minutes: float | None, dist: DistInfo, device) -> None:
        self.signals, self.dist, self.device = signals, dist, device
        self.interval = every_minutes * 60 if every_minutes else None
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """``(save, stop)``, the same on every rank."""
        stop = self.signals.received is not None
        due = self.interval is not None and time.monotonic() - self.last_save >= self.interval
        if self.dist.enabled:  # any rank's signal stops all; rank 0's clock decides the saves
            flags = torch.tensor([float(stop), float(due and self.dist.is_main)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
        return stop or due, stop

    def signal_name(self) -> str:
        return self.signals.received or "a signal on another rank"
