"""torchrun / DDP plumbing: which rank am I, on which device, and a few collectives.

Launched by ``torchrun`` (WORLD_SIZE > 1 in the environment) the process joins the group:
gloo on CPU, NCCL on CUDA. Started plainly it is rank 0 of a world of one and nothing is
initialized. Only rank 0 writes checkpoints and reports (and, from a cluster, reports back
through Dagster Pipes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no GPU; use 'cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def setup(preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world


def broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's ``value`` on every rank."""
    if not info.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
