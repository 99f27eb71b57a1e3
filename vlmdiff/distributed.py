"""Process-group helpers for test inference under torchrun or SLURM (training uses Lightning's)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_ranks() -> Ranks:
    """Rank, world size and local rank from torchrun's or SLURM's environment (1 process otherwise)."""
    env = os.environ
    if "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1 and "SLURM_PROCID" in env:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Ranks()


def init(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (nccl on GPUs, gloo on CPUs) when there is more than one process."""
    if ranks.world == 1 or dist.is_initialized():
        return
    env = os.environ
    if "MASTER_ADDR" not in env:  # plain SLURM without torchrun: the first node of the job hosts the store
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)
    log.info("rank %d of %d joined (%s)", ranks.rank, ranks.world, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
