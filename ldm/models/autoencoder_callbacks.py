"""Callbacks of the autoencoder finetuning: periodic checkpoints and reconstruction images, by generator step."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ldm.models.autoencoder import AutoencoderTraining
from utils.io import write_bytes

log = logging.getLogger(__name__)


class StepCheckpoint(pl.Callback):
    """Writes ``{folder}/last.ckpt`` every ``every_n_steps`` generator updates, at epoch ends and at the end.

    With ``keep`` each periodic save is also kept as ``step=NNNNNNN.ckpt``.
    """

    def __init__(self, folder: str | os.PathLike, every_n_steps: int, keep: bool = False) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self._saved_at: int | None = None  # generator step of the last save

    @property
    def last_path(self) -> Path:
        return self.folder / "last.ckpt"

    def _save(self, trainer: pl.Trainer, module: AutoencoderTraining, keep: bool = False) -> None:
        trainer.save_checkpoint(self.last_path, weights_only=False)
        if keep:
            trainer.save_checkpoint(self.folder / f"step={module.ae_steps:07d}.ckpt", weights_only=False)
        self._saved_at = module.ae_steps
        log.info("checkpoint: %s (generator step %d)", self.last_path, module.ae_steps)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.every_n_steps > 0
            and isinstance(outputs, Mapping)
            and outputs.get("stepped")
            and pl_module.ae_steps % self.every_n_steps == 0
        ):
            self._save(trainer, pl_module, keep=self.keep)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_at != pl_module.ae_steps:
            self._save(trainer, pl_module)


class ReconstructionImages(pl.Callback):
    """Every ``every_n_steps`` generator updates (and after the first), a PNG grid: inputs over reconstructions.

    Images are de-normalised with ``mean``/``std`` (the data's normalisation) and clipped to [0, 1].
    Files: ``{folder}/step_{NNNNNNN}.png``; rank 0 only.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        every_n_steps: int,
        mean: Sequence[float],
        std: Sequence[float],
        max_images: int = 4,
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.max_images = max_images

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps <= 0 or not trainer.is_global_zero or not isinstance(outputs, Mapping):
            return
        step = pl_module.ae_steps
        if not outputs.get("stepped") or not (step == 1 or step % self.every_n_steps == 0):
            return
        self.write(outputs["inputs"], outputs["reconstructions"], self.folder / f"step_{step:07d}.png")

    def write(self, inputs: torch.Tensor, reconstructions: torch.Tensor, path: Path) -> None:
        """Save inputs (top row) and reconstructions (bottom row), (N,3,H,W) each, as one PNG."""
        from PIL import Image
        from torchvision.utils import make_grid

        n = min(self.max_images, inputs.shape[0])
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        images = torch.cat([inputs[:n], reconstructions[:n]]).detach().float().cpu() * std + mean  # (2N, 3, H, W)
        grid = make_grid(images.clamp(0, 1), nrow=n, padding=2)  # (3, H', W')
        arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        write_bytes(path, buf.getvalue())
