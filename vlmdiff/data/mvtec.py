"""MVTec-AD indexing: ``{root}/{class}/train/good/*.png``, ``{root}/{class}/test/{defect}/*.png``,
masks ``{root}/{class}/ground_truth/{defect}/{stem}_mask.png``.

Classes are the sub-folders of the root that hold a ``train`` or ``test`` folder. Every anomalous
test image must have its mask; images directly in ``train/`` or ``test/`` (outside a defect folder)
or defect folders in ``train/`` are layout errors, not silently skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from vlmdiff.data.common import (
    NORMAL_DEFECT,
    Record,
    check_files_exist,
    list_images,
    relative_id,
    require_dir,
    select_classes,
)

logger = logging.getLogger(__name__)


def _expected(root: Path, cls: str = "{class}") -> str:
    return f"{root}/{cls}/train/good/*.png and {root}/{cls}/test/{{defect}}/*.png (MVTec-AD layout)"


def mvtec_classes(root: str | Path) -> list[str]:
    """Class folders of an MVTec-AD root (sorted)."""
    root = Path(root)
    require_dir(root, _expected(root))
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / "train").is_dir() or (d / "test").is_dir():
            classes.append(d.name)
        else:
            logger.warning("ignoring %s: no train/ or test/ folder, so not an MVTec-AD class", d)
    return classes


def _split_images(root: Path, cls: str, split: str) -> list[tuple[str, Path]]:
    """(defect, image path) pairs of one class and split, sorted by defect then file name."""
    split_dir = root / cls / split
    require_dir(split_dir, _expected(root, cls))
    stray = list_images(split_dir)
    if stray:
        raise UserError(
            f"{stray[0]} lies directly in {split_dir}; expected {split_dir}/{{defect}}/*.png "
            f"(normal images in {split_dir}/good/)"
        )
    defects = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split == "train" and defects != [NORMAL_DEFECT]:
        other = [d for d in defects if d != NORMAL_DEFECT]
        if other:
            raise UserError(
                f"{split_dir}/{other[0]}: MVTec-AD train images are all normal; expected only {split_dir}/good/"
            )
    pairs = [(d, p) for d in defects for p in list_images(split_dir / d)]
    if not pairs:
        raise UserError(
            f"no images in {split_dir}; expected {split_dir}/{'good' if split == 'train' else '{defect}'}/*.png"
        )
    return pairs


def index_mvtec(root: str | Path, split: str, classes: Sequence[str] | None = None) -> list[Record]:
    """Index the ``split`` ("train"/"test") images of an MVTec-AD root, optionally of some classes."""
    root = Path(root)
    selected = select_classes(mvtec_classes(root), classes, root, _expected(root))
    records: list[Record] = []
    for cls in selected:
        for defect, image in _split_images(root, cls, split):
            mask = None
            if defect != NORMAL_DEFECT:
                mask = root / cls / "ground_truth" / defect / f"{image.stem}_mask.png"
            records.append(Record(image, mask, cls, int(defect != NORMAL_DEFECT), relative_id(image, root), defect))
    check_files_exist(
        (r.mask_path for r in records if r.mask_path is not None),
        "masks (ground_truth/{defect}/{stem}_mask.png)",
        f"the anomalous test images of {root}",
    )
    return records
