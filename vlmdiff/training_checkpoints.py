"""The checkpoint folder of a training run: periodic and last checkpoints, and what a new run may replace."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from utils.errors import UserError

log = logging.getLogger(__name__)


class PeriodicCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint that, after each save, keeps only the ``keep_last`` newest periodic files.

    Ranked by the number in the name (``model_epoch=NNN.ckpt`` or ``step=NNNNNNN.ckpt``), so the files of
    an earlier process (before --resume), which Lightning's own bookkeeping does not know, count too.
    Files of the other naming (a run that changed its saving flags) and ``last.ckpt`` are left alone.
    """

    def __init__(self, keep_last: int | None, **kwargs: Any) -> None:
        super().__init__(save_top_k=-1, **kwargs)
        self.keep_last = keep_last

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, *args, **kwargs)
        self._prune(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._prune(trainer)

    def _prune(self, trainer: pl.Trainer) -> None:
        if self.keep_last is None or not trainer.is_global_zero or self.dirpath is None:
            return
        prefix = self.filename.split("=")[0] + "="
        for path in periodic_checkpoints(Path(self.dirpath), prefix)[: -self.keep_last]:
            path.unlink(missing_ok=True)
            log.info("--keep_last_n %d: removed %s", self.keep_last, path)


def periodic_checkpoints(ckpt_dir: Path, prefix: str | None = None) -> list[Path]:
    """The ``model_epoch=NNN.ckpt`` / ``step=NNNNNNN.ckpt`` files of ``ckpt_dir`` (of one ``prefix`` if given),
    oldest first (by the number in the name)."""
    found = []
    for path in ckpt_dir.glob("*=*.ckpt"):
        name, _, number = path.stem.partition("=")
        if name in _PERIODIC_NAMES and number.isdigit() and (prefix is None or path.name.startswith(prefix)):
            found.append((int(number), path))
    return [p for _, p in sorted(found)]


_PERIODIC_NAMES = ("model_epoch", "step")


def checkpoint_callback(
    ckpt_dir: Path, every_n_epochs: int | None, every_n_steps: int | None, keep_last: int | None = None
) -> ModelCheckpoint:
    """Periodic checkpoints named as upstream's (``model_epoch=NNN.ckpt``) plus ``last.ckpt`` for --resume.

    NNN is Lightning's 0-based epoch index, zero-padded to 3 digits (the 100th epoch is
    ``model_epoch=099.ckpt``); with ``every_n_steps`` the names are ``step=NNNNNNN.ckpt``. Every periodic
    checkpoint is kept (upstream's behaviour) unless ``keep_last`` is given: then only the ``keep_last``
    newest ones stay, those written before a --resume included (:class:`PeriodicCheckpoints`);
    ``last.ckpt`` always stays. No version counter: a resumed run (even with other saving flags)
    overwrites ``last.ckpt`` instead of starting a ``last-v1.ckpt`` that --resume would not find.
    """
    common = {"dirpath": ckpt_dir, "save_last": True, "auto_insert_metric_name": False, "enable_version_counter": False}
    if every_n_steps:
        return PeriodicCheckpoints(keep_last, filename="step={step:07d}", every_n_train_steps=every_n_steps, **common)
    return PeriodicCheckpoints(
        keep_last,
        filename="model_epoch={epoch:03d}",
        every_n_epochs=every_n_epochs or 1,
        save_on_train_epoch_end=True,
        **common,
    )


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    last = ckpt_dir / "last.ckpt"
    return last if last.is_file() else None


def check_checkpoint_folder(ckpt_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """A new run starts only in a folder without another run's checkpoints, unless ``resume`` or ``overwrite``.

    Returns the earlier run's checkpoints (``*.ckpt``) that ``overwrite`` replaces: remove them with
    :func:`remove_checkpoints` once the new run is ready to train, so the folder never mixes two runs'
    files (its logs are continued). Without either flag such a folder is one :class:`UserError`.
    """
    found = [] if resume else sorted(ckpt_dir.glob("*.ckpt"))
    if found and not overwrite:
        raise UserError(
            f"{ckpt_dir} holds another run's checkpoints ({len(found)}, e.g. {found[-1].name}): pass --resume to "
            "continue that run, choose another --exp_name or --output_root, or pass --overwrite to replace them"
        )
    return found


def remove_checkpoints(paths: list[Path]) -> None:
    """Remove an earlier run's checkpoints (see :func:`check_checkpoint_folder`)."""
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        log.warning("--overwrite: removed %d checkpoint(s) of an earlier run from %s", len(paths), paths[0].parent)
