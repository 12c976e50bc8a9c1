"""DDP set-up from ``torchrun``'s environment (gloo on CPU, NCCL on GPU) and metric reduction."""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long ranks wait at exit for rank 0, which evaluates alone (FID, the IW bound): long enough
# for any evaluation, on a gloo group of its own, so NCCL's 10-minute default never applies to it.
EXIT_WAIT = timedelta(days=1)
_exit_group: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` with more than one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":  # the rank's GPU first, so NCCL binds its communicator to it
            device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    global _exit_group
    if _exit_group is None:
        _exit_group = dist.new_group(backend="gloo", timeout=EXIT_WAIT)
    return info


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wait_for_main() -> None:
    """Every rank waits here until all arrive, however long rank 0's evaluation takes (the exit
    group's timeout); nothing without DDP."""
    if _exit_group is not None and dist.is_initialized():
        dist.barrier(group=_exit_group)


def broadcast_from_main(value: object, info: DistInfo) -> object:
    """Rank 0's ``value`` on every rank (on the exit group, which waits as long as rank 0 takes);
    ``value`` itself without DDP."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_exit_group)
    return box[0]


def shutdown(info: DistInfo) -> None:
    """Leave the process group once every rank is done (rank 0 with its evaluation).

    The ranks first meet on the exit group, whose timeout outlasts any evaluation, then on the
    default group before it is torn down: a gloo worker thread frees the work of the last
    collective after the caller's wait returns, and freeing Python-owned tensors needs the GIL.
    Were the main thread tearing the group down by then (it holds the GIL while it joins the
    workers), the two would wait for each other: torch 2.11 hangs so at exit. The barrier waits
    with the GIL released, so the worker finishes first; its own work holds no Python tensor."""
    global _exit_group
    if info.enabled and dist.is_initialized():
        wait_for_main()
        dist.barrier()
        dist.destroy_process_group()
        _exit_group = None
