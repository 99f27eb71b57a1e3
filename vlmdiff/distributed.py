"""Process-group helpers for test inference and captioning under torchrun or SLURM (training uses Lightning's).

Rank, world size and the rendezvous address come from Lightning's cluster environments, tried in this
order: ``TorchElasticEnvironment`` (torchrun, also inside a SLURM job), ``SLURMEnvironment`` (tasks
started by ``srun``), else one process (``LightningEnvironment``). ``SLURMEnvironment.detect()`` also
says yes in a batch script that runs ``python test.py`` without ``srun`` (its variables describe the
job, not this process); ``srun`` marks each task it starts with ``SLURM_STEP_ID``, so without that
variable the job runs as one process and says how to use all its tasks. Joining the process group
waits at most ``timeout_s``, so a rank that never comes ends the run with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from utils.errors import UserError

if TYPE_CHECKING:  # torch and Lightning are imported on first use: a script's --help needs neither
    import torch
    from lightning.fabric.plugins.environments import ClusterEnvironment

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800  # torch's own default for the process group


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    environment: ClusterEnvironment | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_ranks() -> Ranks:
    """Rank, world size and local rank of this process (one process when no launcher started it)."""
    env = _cluster_environment()
    return Ranks(env.global_rank(), env.world_size(), env.local_rank(), env)


def _cluster_environment() -> ClusterEnvironment:
    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect():
        ntasks = os.environ.get("SLURM_NTASKS", "1")
        if "SLURM_STEP_ID" not in os.environ:  # the batch script's own process, not a task started by srun
            if int(ntasks) > 1:
                log.warning(
                    "this SLURM job has %s tasks but the process was not started by srun: running as one "
                    "process (prefix the command with srun to use every task)",
                    ntasks,
                )
            return LightningEnvironment()
        try:
            return SLURMEnvironment(auto_requeue=False)
        except RuntimeError as e:  # Lightning's check of the srun variables, e.g. --ntasks without --ntasks-per-node
            raise UserError(f"SLURM job settings: {' '.join(str(e).split())}") from e
    return LightningEnvironment()


def init(ranks: Ranks, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group (nccl on GPUs, gloo on CPUs) when there is more than one process.

    ``timeout_s`` bounds the wait for the other ranks, when joining and at every later barrier.
    """
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment

    if ranks.world == 1 or dist.is_initialized():
        return
    if timeout_s <= 0:
        raise UserError(f"--dist_timeout must be > 0 seconds, got {timeout_s}")
    env = ranks.environment or LightningEnvironment()
    # as Lightning's DDP strategy does: the environment names the rendezvous, torch reads it from env://
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend, rank=ranks.rank, world_size=ranks.world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    except RuntimeError as e:  # DistStoreError and the backends' timeouts derive from it
        raise UserError(
            f"rank {ranks.rank} of {ranks.world} could not join the others at {address} within "
            f"{timeout_s:g} s ({type(e).__name__}); check that every rank was started, or raise "
            "--dist_timeout"
        ) from e
    log.info("rank %d of %d joined at %s (%s)", ranks.rank, ranks.world, address, backend)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
