"""COCO-AD indexing from ADer's meta files.

``{root}/meta_20_{p}.json`` = ``{"train": {"coco": [...]}, "test": {"coco": [...]}}`` with items
``{img_path, mask_path ("" if normal), cls_name "coco", specie_name, anomaly 0/1}``; paths relative to
the root (images in ``train2017/`` and ``val2017/``, masks in ``val2017_mask_ad_20_{p}/``). The image
id is ``img_path`` as written in the meta file. ``utils/prepare_coco_ad.py`` makes these files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from utils.io import read_json
from vlmdiff.data.common import NORMAL_DEFECT, Record, check_files_exist, require_dir

COCO_CLASS = "coco"
PARTS = (0, 1, 2, 3)


def meta_path(root: str | Path, part: int) -> Path:
    """``{root}/meta_20_{part}.json``."""
    return Path(root) / f"meta_20_{part}.json"


def check_part(part: int | None) -> int:
    """Validate ``coco_part`` (0..3) for COCO-AD."""
    if part is None or int(part) not in PARTS:
        raise UserError(f"COCO-AD needs --coco_part in 0..3 (got {part}); each part holds out 20 categories")
    return int(part)


def index_coco(root: str | Path, split: str, part: int | None, classes: Sequence[str] | None = None) -> list[Record]:
    """Index the ``split`` images of COCO-AD part ``part``."""
    root = Path(root)
    part = check_part(part)
    require_dir(root, f"{meta_path(root, part)} and the train2017/ val2017/ images (COCO-AD layout)")
    if classes is not None and list(classes) != [COCO_CLASS]:
        raise UserError(f"COCO-AD has one class, {COCO_CLASS!r}; got class filter {list(classes)}")
    path = meta_path(root, part)
    if not path.is_file():
        raise UserError(f"COCO-AD meta file not found: expected {path} (make it with utils/prepare_coco_ad.py)")
    doc = read_json(path)
    try:
        items = doc[split][COCO_CLASS]
    except (KeyError, TypeError):
        raise UserError(f'{path}: expected {{"{split}": {{"{COCO_CLASS}": [...]}}}}') from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: no {split} images listed")
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not item.get("img_path") or "anomaly" not in item:
            raise UserError(f"{path}: {split}.coco[{i}] lacks img_path or anomaly")
        label = int(item["anomaly"])
        mask = None
        if label:
            if not item.get("mask_path"):
                raise UserError(f"{path}: {split}.coco[{i}] ({item['img_path']}) is anomalous but has no mask_path")
            mask = root / item["mask_path"]
        defect = (item.get("specie_name") or "anomaly") if label else NORMAL_DEFECT
        img_id = Path(item["img_path"]).as_posix()
        records.append(Record(root / item["img_path"], mask, COCO_CLASS, label, img_id, str(defect)))
    check_files_exist((r.image_path for r in records), "images", str(path))
    check_files_exist((r.mask_path for r in records if r.mask_path is not None), "masks", str(path))
    return records
