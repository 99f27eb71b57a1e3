"""Real-IAD indexing through the official per-class JSON files.

Images ``{root}/{class}/{OK|NG/<defect>}/S..../*.jpg``; the JSON of a class is read from
``{root}/../real_iad_jsons/realiad_jsons/{class}.json`` (upstream's code) or
``{root}/../real_iad_jsons/{class}.json`` (upstream's README), the first that exists. Its ``train``
and ``test`` lists hold records ``{image_path, mask_path, anomaly_class}``; ``anomaly_class`` "OK"
is normal. Paths are relative to the class folder; JSON files whose paths already start with the
class name (relative to the root) are accepted too — decided once per file, never per record.
Each of the 5 camera views is its own image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from utils.io import read_json
from vlmdiff.data.common import NORMAL_DEFECT, Record, check_files_exist, relative_id, require_dir, select_classes

logger = logging.getLogger(__name__)
NORMAL_CLASS = "OK"


def _expected(root: Path) -> str:
    return f"{root}/{{class}}/OK/S..../*.jpg and {root}/{{class}}/NG/{{defect}}/S..../*.jpg (Real-IAD layout)"


def json_candidates(root: str | Path, cls: str) -> list[Path]:
    """Where the JSON of ``cls`` may lie, in the order they are tried."""
    parent = Path(os.path.abspath(root)).parent
    return [parent / "real_iad_jsons" / "realiad_jsons" / f"{cls}.json", parent / "real_iad_jsons" / f"{cls}.json"]


def find_json(root: str | Path, cls: str) -> Path:
    """The JSON file of class ``cls``; a UserError naming both expected locations if neither exists."""
    candidates = json_candidates(root, cls)
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"Real-IAD JSON of class {cls!r} not found: expected {candidates[0]} or {candidates[1]}")


def realiad_classes(root: str | Path) -> list[str]:
    """Class folders of a Real-IAD root: sub-folders that hold ``OK`` or ``NG``."""
    root = Path(root)
    require_dir(root, _expected(root))
    classes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (d / "OK").is_dir() or (d / "NG").is_dir():
            classes.append(d.name)
        else:
            logger.warning("ignoring %s: no OK/ or NG/ folder, so not a Real-IAD class", d)
    return classes


def _base_folder(root: Path, cls: str, items: list[dict], json_path: Path) -> Path:
    """The folder the JSON's paths are relative to: the class folder, or the root if they start with the class."""
    first = str(items[0].get("image_path") or "")
    if not (root / cls / first).is_file() and (root / first).is_file() and Path(first).parts[:1] == (cls,):
        logger.info("%s: paths are relative to the dataset root", json_path)
        return root
    return root / cls


def index_realiad(root: str | Path, split: str, classes: Sequence[str] | None = None) -> list[Record]:
    """Index the ``split`` images of a Real-IAD root (all classes or the given ones)."""
    root = Path(root)
    selected = select_classes(realiad_classes(root), classes, root, _expected(root))
    records: list[Record] = []
    for cls in selected:
        json_path = find_json(root, cls)
        doc = read_json(json_path)
        items = doc.get(split) if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise UserError(f"{json_path}: expected a JSON object with a list {split!r} of image records")
        if not items:
            raise UserError(f"{json_path}: the {split!r} list is empty")
        base = _base_folder(root, cls, items, json_path)
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not item.get("image_path") or "anomaly_class" not in item:
                raise UserError(f"{json_path}: {split}[{i}] lacks image_path or anomaly_class")
            anomalous = str(item["anomaly_class"]) != NORMAL_CLASS
            image = base / item["image_path"]
            mask = None
            if anomalous:
                if not item.get("mask_path"):
                    raise UserError(
                        f"{json_path}: {split}[{i}] ({item['image_path']}) is anomalous but has no mask_path"
                    )
                mask = base / item["mask_path"]
            defect = str(item["anomaly_class"]) if anomalous else NORMAL_DEFECT
            records.append(Record(image, mask, cls, int(anomalous), relative_id(image, root), defect))
        check_files_exist((r.image_path for r in records if r.class_name == cls), "images", str(json_path))
        check_files_exist(
            (r.mask_path for r in records if r.class_name == cls and r.mask_path is not None), "masks", str(json_path)
        )
    return records
