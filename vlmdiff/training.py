"""Training plumbing for train.py: callbacks, data loader, run folder and the Lightning Trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AtomicCheckpointIO
from utils.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")


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


def make_trainer(args: Any, ckpt_dir: Path, callbacks: list[Callback]) -> pl.Trainer:
    precision = "32-true" if args.precision == "32" else args.precision
    loggers = [TensorBoardLogger(save_dir=str(ckpt_dir), name="logs", version=""),
               CSVLogger(save_dir=str(ckpt_dir), name="logs", version="")]
    return pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        precision=precision, max_epochs=args.max_epochs, max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate_grad_batches, callbacks=callbacks, logger=loggers,
        log_every_n_steps=args.log_every_n_steps, default_root_dir=str(ckpt_dir), num_sanity_val_steps=0,
        limit_val_batches=0, enable_progress_bar=not args.no_progress_bar, benchmark=False,
        plugins=[AtomicCheckpointIO()],  # temporary file beside the target, fsync, rename (utils.io)
    )
