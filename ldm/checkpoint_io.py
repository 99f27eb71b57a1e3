"""Lightning's checkpoint IO through this project's atomic writes, storing the weights digest.

Only training imports this module (and with it Lightning); :mod:`ldm.checkpoint` stays light.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm.checkpoint import DIGEST_KEY, _short, weights_digest
from utils.io import atomic_open

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through a temporary file, fsync and rename (``utils.io``), with
    the :func:`weights_digest` of their ``state_dict`` stored as :data:`DIGEST_KEY`; read memory-mapped."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if isinstance(checkpoint.get("state_dict"), Mapping):
            try:
                checkpoint = {**checkpoint, DIGEST_KEY: weights_digest(checkpoint["state_dict"])}
            except (RuntimeError, TypeError) as e:  # tensors a strategy keeps sharded: identified when read
                log.warning("%s: saved without a weights digest (%s)", path, _short(e))
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Resuming: the file is memory-mapped, so the optimiser state and weights are read as they are restored."""
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
