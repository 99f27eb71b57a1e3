"""The training DataLoader: shuffled batches, resumable in the middle of an epoch."""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from utils.errors import UserError


class SkippingBatchSampler(BatchSampler):
    """A BatchSampler whose next pass can leave out its first ``skip`` batches (without loading them)."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable in the middle of an epoch.

    Its state (in every checkpoint, through Lightning's stateful-loader support) is the shuffling
    generator's state at the start of the epoch and the number of batches of the epoch already trained
    (counted by :class:`TrainedBatches`). A resumed run restores the generator, so the epoch is shuffled
    as before, and its batch sampler leaves out the batches already trained: together with the random
    states of :class:`PerRankSeed` the run continues as if it had not stopped. An interrupted
    accumulation (``accumulate_grad_batches`` > 1) loses the gradients of its batches trained so far.
    The batches and their order are those of ``DataLoader(shuffle=True, generator=...)``.
    """

    _epoch_start: torch.Tensor | None = None
    _resume: dict[str, Any] | None = None
    trained = 0  # batches of the current epoch trained so far

    def __iter__(self):
        resume, self._resume = self._resume, None
        if resume and self.generator is not None:
            self.generator.set_state(resume["generator"])
            self.batch_sampler.skip = resume["batches"]
        self.trained = resume["batches"] if resume else 0
        self._epoch_start = self.generator.get_state() if self.generator is not None else None
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        if self._epoch_start is None:
            return {}
        if self.trained >= len(self):  # the epoch is complete: the next one starts from the current state
            return {"generator": self.generator.get_state(), "batches": 0, "world": _world_size()}
        return {"generator": self._epoch_start, "batches": self.trained, "world": _world_size()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` at the next ``iter()``; a state of another number of ranks is ignored."""
        if state_dict.get("world") == _world_size() and isinstance(self.batch_sampler, SkippingBatchSampler):
            self._resume = dict(state_dict)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class TrainedBatches(Callback):
    """Tell the :class:`ResumableLoader` how many batches of its epoch were trained (for its checkpoint state)."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.trained = batch_idx + 1


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> ResumableLoader:
    """Shuffled batches (seeded by ``seed``), resumable mid-epoch with :class:`TrainedBatches` among the callbacks."""
    if len(dataset) == 0:
        raise UserError("the training set has no images: check --data_path, --data_set and --classes")
    generator = torch.Generator().manual_seed(seed)
    sampler = SkippingBatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    return ResumableLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        generator=generator,
    )
