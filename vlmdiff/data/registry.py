"""Dataset names, their aliases and one entry point to index any of them (no torch import here).

The one list of dataset names every script's ``--data_set`` offers: :data:`DATASET_NAMES` (canonical) plus
:data:`ALIASES` (other spellings users type, e.g. upstream's ``real_iad``); :func:`canonical_name` maps
either to the canonical name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from vlmdiff.data.coco import index_coco
from vlmdiff.data.common import Record, check_utf8_names
from vlmdiff.data.folder import index_folder
from vlmdiff.data.mvtec import index_mvtec
from vlmdiff.data.realiad import index_realiad
from vlmdiff.data.visa import index_visa

DATASET_NAMES: tuple[str, ...] = ("mvtec", "visa", "realiad", "coco", "folder")
ALIASES: tuple[tuple[str, str], ...] = (("real_iad", "realiad"),)  # (alias, canonical name)
LABELLED: tuple[str, ...] = ("mvtec", "visa", "realiad", "coco")  # the paper's datasets; folder has no labels
SPLITS: tuple[str, ...] = ("train", "test")


def dataset_choices(folder: bool = True) -> tuple[str, ...]:
    """What ``--data_set`` accepts: the canonical names (``folder`` only when ``folder``), then the aliases."""
    names = DATASET_NAMES if folder else LABELLED
    return names + tuple(alias for alias, canonical in ALIASES if canonical in names)


def aliases_note() -> str:
    """``--data_set`` help's note on the aliases, e.g. ``real_iad is accepted for realiad``."""
    return "; ".join(f"{alias} is accepted for {canonical}" for alias, canonical in ALIASES)


def canonical_name(name: str) -> str:
    """The canonical dataset token (``real_iad`` -> ``realiad``); unknown names are a UserError."""
    key = str(name).strip().lower()
    key = dict(ALIASES).get(key, key)
    if key not in DATASET_NAMES:
        valid = ", ".join(DATASET_NAMES + tuple(a for a, _ in ALIASES))
        raise UserError(f"unknown dataset {name!r}; valid names: {valid}")
    return key


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return split


def index_dataset(
    name: str, root: str | Path, split: str, *, classes: Sequence[str] | None = None, coco_part: int | None = None
) -> list[Record]:
    """Index ``split`` of dataset ``name`` at ``root`` into records (see each dataset module)."""
    key = canonical_name(name)
    check_split(split)
    if isinstance(classes, str):
        classes = [classes]
    if key == "mvtec":
        records = index_mvtec(root, split, classes)
    elif key == "visa":
        records = index_visa(root, split, classes)
    elif key == "realiad":
        records = index_realiad(root, split, classes)
    elif key == "coco":
        records = index_coco(root, split, coco_part, classes)
    else:
        records = index_folder(root, split, classes)
    check_utf8_names(records, Path(root))
    return records
