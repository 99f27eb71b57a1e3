"""Datasets of the paper (MVTec-AD, VisA, Real-IAD, COCO-AD) plus a plain image folder, and caption files.

Indexing (no torch needed): :func:`index_dataset` returns :class:`Record` lists. Model inputs:
:func:`build_dataset` returns a torch Dataset whose items are dicts with the keys ``image``,
``hint``, ``caption``, ``mask``, ``filename``, ``class_name``, ``label`` (see
``vlmdiff.data.dataset``). Captions: :func:`load_captions`, :func:`match_captions`.
``build_dataset`` and ``AnomalyDataset`` are imported on first use, so indexing and captioning with
the template backend do not import torch.
"""

from __future__ import annotations

from typing import Any

from vlmdiff.data.captions import load_captions, match_captions
from vlmdiff.data.common import Record, load_mask, load_rgb
from vlmdiff.data.registry import DATASET_NAMES, canonical_name, index_dataset

__all__ = [
    "AnomalyDataset",
    "DATASET_NAMES",
    "ITEM_KEYS",
    "Record",
    "build_dataset",
    "canonical_name",
    "index_dataset",
    "load_captions",
    "load_mask",
    "load_rgb",
    "match_captions",
]


def __getattr__(name: str) -> Any:
    if name in ("AnomalyDataset", "build_dataset", "ITEM_KEYS"):
        from vlmdiff.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
