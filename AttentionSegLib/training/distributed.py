"""Multi-process training through ``torchrun`` (DistributedDataParallel): NCCL on CUDA, gloo on the CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment; a no-op for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for_rank(device: torch.device, context: DistributedContext) -> torch.device:
    """Each CUDA rank takes its own GPU (``LOCAL_RANK``); CPU ranks share the CPU."""
    if device.type == "cuda" and context.enabled:
        torch.cuda.set_device(context.local_rank)
        return torch.device("cuda", context.local_rank)
    return device


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def all_equal(value: str, context: DistributedContext) -> bool:
    """True when every rank holds the same string (used to check that DDP replicas stayed in sync)."""
    if not context.enabled:
        return True
    values: list[str | None] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def broadcast_flag(flag: bool, context: DistributedContext) -> bool:
    """Rank 0's decision for everyone (e.g. 'cancel')."""
    if not context.enabled:
        return flag
    holder = [flag]
    dist.broadcast_object_list(holder, src=0)
    return bool(holder[0])


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
