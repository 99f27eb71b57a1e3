"""Training plumbing for train.py: callbacks, data loader, run folder and the Lightning Trainer."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AtomicCheckpointIO
from utils.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
EXIT_PREEMPTED = 128 + 15  # what a process killed by SIGTERM reports; schedulers read it as "terminated"


class Preempted(SystemExit):
    """Training stopped on SIGTERM after saving a resumable checkpoint; the process exits with 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


class SaveOnSigterm(Callback):
    """On SIGTERM (SLURM preemption or time limit), save ``path`` with the full training state and stop.

    Lightning's signal connector sets ``trainer.received_sigterm`` and ends the fit with a
    ``SIGTERMException`` at the next batch end; this callback then writes the checkpoint through the
    trainer (so the atomic checkpoint IO and the weight check of :class:`FiniteTraining` apply).
    The script turns the exception into :class:`Preempted`. Under SLURM with ``auto_requeue``
    Lightning's own SIGUSR1 handling (requeue) is unchanged.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        log.warning("SIGTERM: saved %s at step %d (epoch %d); continue with --resume", self.path,
                    trainer.global_step, trainer.current_epoch)


class FiniteTraining(Callback):
    """Stop at the first non-finite loss, naming the step; refuse to save non-finite weights.

    A NaN/inf loss (a too large ``--lr``, a broken input) raises :class:`UserError` at the end of its
    batch, before any checkpoint callback of that batch runs. Every checkpoint (periodic, last, SIGTERM)
    is checked too: a floating tensor with NaN/inf values stops the save, so no file on disk is
    replaced by diverged weights. With ``log_every_n_steps`` > 0 it also logs the loss every that many
    batches (what a cluster log shows without a progress bar).
    """

    def __init__(self, log_every_n_steps: int = 0):
        self.log_every_n_steps = log_every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return
        value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise UserError(f"training diverged: the loss is {value} at step {trainer.global_step} (epoch "
                            f"{trainer.current_epoch}, batch {batch_idx}); the checkpoints on disk are unchanged: "
                            "lower --lr (or --base_lr) and restart, or --resume from the last good checkpoint")
        if self.log_every_n_steps > 0 and (batch_idx + 1) % self.log_every_n_steps == 0:
            log.info("step %d (epoch %d, batch %d): loss %.5g", trainer.global_step, trainer.current_epoch,
                     batch_idx + 1, value)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise UserError(f"training diverged: at step {trainer.global_step} {len(bad)} weights hold NaN or "
                            f"infinite values (e.g. {bad[0]}); not saving them, the checkpoints on disk are "
                            "unchanged: lower --lr (or --base_lr) and restart, or --resume")


class PerRankSeed(Callback):
    """Seed the noise and timestep draws of each rank from the global seed (seed + global rank).

    The data order comes from the (distributed) sampler, seeded by the global seed on every rank, so
    ranks see disjoint shards; the diffusion noise differs per rank.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.manual_seed(self.seed + trainer.global_rank)


class SaveProvenance(Callback):
    """Store what made the checkpoint (seed, config, versions, commit, command) inside it."""

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["provenance"] = {**self.info, "global_step": trainer.global_step, "epoch": trainer.current_epoch}


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    if len(dataset) == 0:
        raise UserError("the training set has no images: check --data_path, --data_set and --classes")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=False,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0, generator=generator)


def checkpoint_callback(ckpt_dir: Path, every_n_epochs: int | None, every_n_steps: int | None,
                        keep_last: int | None = None) -> ModelCheckpoint:
    """Periodic checkpoints named as upstream's (``model_epoch=NNN.ckpt``) plus ``last.ckpt`` for --resume.

    NNN is Lightning's 0-based epoch index, zero-padded to 3 digits (the 100th epoch is
    ``model_epoch=099.ckpt``); with ``every_n_steps`` the names are ``step=NNNNNNN.ckpt``. Every periodic
    checkpoint is kept (upstream's behaviour) unless ``keep_last`` is given: then only the ``keep_last``
    most recent ones stay (ranked by global step), ``last.ckpt`` always stays. No version counter: a
    resumed run (even with other saving flags) overwrites ``last.ckpt`` instead of starting a
    ``last-v1.ckpt`` that --resume would not find.
    """
    retention = ({"save_top_k": -1} if keep_last is None
                 else {"save_top_k": keep_last, "monitor": "step", "mode": "max"})
    common = {"dirpath": ckpt_dir, "save_last": True, "auto_insert_metric_name": False,
              "enable_version_counter": False, **retention}
    if every_n_steps:
        return ModelCheckpoint(filename="step={step:07d}", every_n_train_steps=every_n_steps, **common)
    return ModelCheckpoint(filename="model_epoch={epoch:03d}", every_n_epochs=every_n_epochs or 1,
                           save_on_train_epoch_end=True, **common)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    last = ckpt_dir / "last.ckpt"
    return last if last.is_file() else None


def check_devices(accelerator: str, devices: int | str | list[int]) -> None:
    """--accelerator / --devices that Lightning would reject later (or that this machine lacks), as one line."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    known = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
    if accelerator not in known:
        raise UserError(f"--accelerator {accelerator!r} is not one of {', '.join(known)}")
    gpu = accelerator in ("gpu", "cuda")
    if isinstance(devices, list):
        if not devices or min(devices) < 0 or len(set(devices)) != len(devices):
            raise UserError(f"--devices {','.join(map(str, devices))}: give distinct device indices 0, 1, ...")
        if accelerator == "cpu":
            raise UserError("--devices with a list of indices needs GPUs; with --accelerator cpu give a number")
    elif isinstance(devices, int) and devices < 1 and devices != -1:
        raise UserError(f"--devices {devices} must be 1 or more, -1 (all) or auto")
    if gpu:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = max(devices) + 1 if isinstance(devices, list) else devices if isinstance(devices, int) else 1
        if count == 0:
            raise UserError(f"--accelerator {accelerator}: no CUDA device is available (use --accelerator cpu or auto)")
        if wanted > count:
            raise UserError(f"--devices {devices}: this machine has {count} GPU(s)")


def make_trainer(args: Any, ckpt_dir: Path, callbacks: list[Callback]) -> pl.Trainer:
    precision = "32-true" if args.precision == "32" else args.precision
    loggers = [TensorBoardLogger(save_dir=str(ckpt_dir), name="logs", version=""),
               CSVLogger(save_dir=str(ckpt_dir), name="logs", version="")]
    try:
        return _trainer(args, ckpt_dir, callbacks, precision, loggers)
    except MisconfigurationException as e:  # a combination of hardware flags Lightning rejects
        raise UserError(f"{e} (check --accelerator, --devices, --num_nodes, --strategy, --precision)") from e


def _trainer(args: Any, ckpt_dir: Path, callbacks: list[Callback], precision: str, loggers: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        precision=precision, max_epochs=args.max_epochs, max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate_grad_batches, callbacks=callbacks, logger=loggers,
        log_every_n_steps=args.log_every_n_steps, default_root_dir=str(ckpt_dir), num_sanity_val_steps=0,
        limit_val_batches=0, enable_progress_bar=not args.no_progress_bar, benchmark=False,
        plugins=[AtomicCheckpointIO()],  # temporary file beside the target, fsync, rename (utils.io)
    )
