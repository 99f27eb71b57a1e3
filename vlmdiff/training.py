"""Training plumbing for train.py (and finetune_autoencoder.py): callbacks, loggers, the Trainer.

The resumable data loader is in :mod:`vlmdiff.training_data`, the checkpoint folder in
:mod:`vlmdiff.training_checkpoints`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from ldm.checkpoint_io import AtomicCheckpointIO
from utils.errors import UserError
from utils.progress import DEFAULT_INTERVAL_S, ProgressLines, is_terminal

log = logging.getLogger(__name__)

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
        log.warning(
            "SIGTERM: saved %s at step %d (epoch %d); continue with --resume",
            self.path,
            trainer.global_step,
            trainer.current_epoch,
        )


class FiniteTraining(Callback):
    """Stop at the first non-finite loss, naming the step; refuse to save non-finite weights.

    A NaN/inf loss (a too large ``--lr``, a broken input) raises :class:`UserError` at the end of its
    batch, before any checkpoint callback of that batch runs. Every checkpoint (periodic, last, SIGTERM)
    is checked too: a floating tensor with NaN/inf values stops the save, so no file on disk is
    replaced by diverged weights.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return
        value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise UserError(
                f"training diverged: the loss is {value} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch}, batch {batch_idx}); the checkpoints on disk are unchanged: "
                "lower --lr (or --base_lr) and restart, or --resume from the last good checkpoint"
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        bad = [
            k
            for k, v in checkpoint.get("state_dict", {}).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
        ]
        if bad:
            raise UserError(
                f"training diverged: at step {trainer.global_step} {len(bad)} weights hold NaN or "
                f"infinite values (e.g. {bad[0]}); not saving them, the checkpoints on disk are "
                "unchanged: lower --lr (or --base_lr) and restart, or --resume"
            )


class PerRankSeed(Callback):
    """Seed the noise and timestep draws of each rank from the global seed (seed + global rank).

    The data order comes from the (distributed) sampler, seeded by the global seed on every rank, so
    ranks see disjoint shards; the diffusion noise differs per rank. Every checkpoint holds the random
    number states of all ranks (torch's CPU generator and the current CUDA device's), and a run resumed
    on the same number of ranks continues them instead of seeding again: it draws the same noise as the
    run that was interrupted. On another number of ranks it seeds from (seed + rank) again.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._restored: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(trainer.strategy.root_device)
        # one row per rank; a collective, like the checkpoint save that calls it on every rank
        return {name: _gather_rows(trainer, state) for name, state in states.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, {}
        rank = trainer.global_rank
        if restored.get("cpu") is not None and len(restored["cpu"]) == trainer.world_size:
            torch.set_rng_state(restored["cpu"][rank].clone())
            if "cuda" in restored and trainer.strategy.root_device.type == "cuda":
                torch.cuda.set_rng_state(restored["cuda"][rank].clone(), trainer.strategy.root_device)
            return
        if restored:
            log.warning(
                "the checkpoint's random states are of %d rank(s), this run has %d: seeding again",
                len(restored["cpu"]),
                trainer.world_size,
            )
        torch.manual_seed(self.seed + rank)


def _gather_rows(trainer: pl.Trainer, state: torch.Tensor) -> torch.Tensor:
    """``state`` (a 1-d byte tensor) of every rank stacked in rank order, on the CPU."""
    if trainer.world_size == 1:
        return state.unsqueeze(0).clone()
    gathered = trainer.strategy.all_gather(state.to(trainer.strategy.root_device))
    return gathered.cpu()


class SaveProvenance(Callback):
    """Store what made the checkpoint (seed, config, versions, commit, command) inside it."""

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["provenance"] = {**self.info, "global_step": trainer.global_step, "epoch": trainer.current_epoch}


class ParameterCount(ModelSummary):
    """One log line with the parameter counts instead of Lightning's per-module table and mode counts."""

    @staticmethod
    def summarize(
        summary_data: list,
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **kwargs: Any,
    ) -> None:
        log.info(
            "model: %s trainable of %s parameters (%.1f MB)",
            get_human_readable_count(trainable_parameters),
            get_human_readable_count(total_parameters),
            model_size,
        )


class ProgressLog(Callback):
    """Plain progress lines (utils.progress) on global rank zero, for logs that are not terminals.

    Each line shows the epoch, optimiser steps done of the total, the progress-bar metrics averaged over
    the batches since the previous line, the rate and the ETA. ``step_of`` / ``total_steps`` count other
    steps than ``trainer.global_step`` / ``trainer.estimated_stepping_batches`` (the autoencoder counts
    generator updates).
    """

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        step_of: Callable[[pl.Trainer, pl.LightningModule], int] | None = None,
        total_steps: Callable[[pl.Trainer], float] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.step_of = step_of or (lambda trainer, module: trainer.global_step)
        self.total_steps = total_steps or (lambda trainer: trainer.estimated_stepping_batches)
        self._lines: ProgressLines | None = None
        self._sums: dict[str, tuple[float, int]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            total = self.total_steps(trainer)
            total = int(total) if total and math.isfinite(total) and total > 0 else None
            self._lines = ProgressLines(
                "train", total, "step", self.interval_s, start=self.step_of(trainer, pl_module), logger=log
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._lines is None:
            return
        for key, value in trainer.progress_bar_metrics.items():
            if not key.endswith("_epoch"):
                total, n = self._sums.get(key, (0.0, 0))
                self._sums[key] = (total + float(value), n + 1)
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        means = {k.removesuffix("_step").split("/")[-1]: total / n for k, (total, n) in self._sums.items()}
        if self._lines.set(
            self.step_of(trainer, pl_module), f"train epoch {trainer.current_epoch + 1}{epochs}", **means
        ):
            self._sums = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lines is not None:
            self._lines.close()
            self._lines = None


def progress_callbacks(no_progress_bar: bool, interval_s: float, **progress_log: Any) -> tuple[bool, list[Callback]]:
    """``(enable_progress_bar, callbacks)``: Lightning's bar on a terminal, else :class:`ProgressLog` lines.

    Either way the model summary is one line (:class:`ParameterCount`). ``progress_log``: see ProgressLog.
    """
    bar = not no_progress_bar and is_terminal()
    return bar, [ParameterCount()] + ([] if bar else [ProgressLog(interval_s, **progress_log)])


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


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted."""

    def _check_log_dir_exists(self) -> None:  # Lightning's version removes metrics.csv of a non-empty folder
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # new columns rewrite the header, keeping the rows


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger whose ``metrics.csv`` keeps the rows of earlier runs in the same folder (``--resume``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_loggers(folder: Path, csv_dir: str = "logs", tensorboard_dir: str = "logs") -> list[Logger]:
    """CSV and TensorBoard loggers writing straight into ``folder/csv_dir`` and ``folder/tensorboard_dir``.

    No ``version_N`` sub-folders: a resumed run appends rows to the same ``metrics.csv`` and adds an event
    file beside the earlier ones, so the history of every attempt stays in one place.
    """
    return [
        TensorBoardLogger(save_dir=str(folder), name=tensorboard_dir, version="", default_hp_metric=False),
        AppendingCSVLogger(save_dir=str(folder), name=csv_dir, version=""),
    ]


@dataclass(frozen=True)
class TrainerOptions:
    """What the Lightning Trainer of a VLMDiff training run is built with: budget, hardware, logging."""

    max_epochs: int
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32"  # Lightning's names; "32" is "32-true"
    log_every_n_steps: int = 10
    progress_bar: bool = True  # a bar on a terminal; log lines every log_interval s elsewhere
    log_interval: float = DEFAULT_INTERVAL_S


def make_trainer(options: TrainerOptions, ckpt_dir: Path, callbacks: list[Callback]) -> pl.Trainer:
    """The Trainer of a training run writing logs into ``ckpt_dir``; flags Lightning rejects are one UserError."""
    loggers = run_loggers(ckpt_dir)
    try:
        return _trainer(options, ckpt_dir, callbacks, loggers)
    except MisconfigurationException as e:  # a combination of hardware flags Lightning rejects
        raise UserError(f"{e} (check --accelerator, --devices, --num_nodes, --strategy, --precision)") from e


def _trainer(options: TrainerOptions, ckpt_dir: Path, callbacks: list[Callback], loggers: list) -> pl.Trainer:
    bar, progress = progress_callbacks(not options.progress_bar, options.log_interval)
    return pl.Trainer(
        accelerator=options.accelerator,
        devices=options.devices,
        num_nodes=options.num_nodes,
        strategy=options.strategy,
        precision="32-true" if options.precision == "32" else options.precision,
        max_epochs=options.max_epochs,
        max_steps=options.max_steps,
        accumulate_grad_batches=options.accumulate_grad_batches,
        callbacks=callbacks + progress,
        logger=loggers,
        log_every_n_steps=options.log_every_n_steps,
        default_root_dir=str(ckpt_dir),
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_progress_bar=bar,
        benchmark=False,
        plugins=[AtomicCheckpointIO()],  # temporary file beside the target, fsync, rename (utils.io)
    )
