"""VisA indexing through the official split csv ``{root}/split_csv/1cls.csv``.

Columns ``object, split, label, image, mask``; ``label`` is "normal" or "anomaly"; paths are relative
to the root (images ``{class}/Data/Images/{Normal,Anomaly}/*.JPG``, masks
``{class}/Data/Masks/Anomaly/*.png``). Every listed file must exist.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from vlmdiff.data.common import NORMAL_DEFECT, Record, check_files_exist, require_dir, select_classes

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1, "0": 0, "1": 1}


def _expected(root: Path) -> str:
    return f"{root}/{{class}}/Data/Images/{{Normal,Anomaly}}/*.JPG and the split file {root / SPLIT_CSV} (VisA layout)"


def read_visa_csv(root: str | Path) -> list[dict[str, str]]:
    """Rows of the split csv, checked for its columns; a missing csv says where it was expected."""
    root = Path(root)
    require_dir(root, _expected(root))
    path = root / SPLIT_CSV
    if not path.is_file():
        raise UserError(
            f"VisA split csv not found: expected {path} (the official 1cls split shipped with VisA "
            "as split_csv/1cls.csv)"
        )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected columns {', '.join(COLUMNS)}")
        rows = [dict(row, _line=str(i + 2)) for i, row in enumerate(reader)]
    return rows


def index_visa(root: str | Path, split: str, classes: Sequence[str] | None = None) -> list[Record]:
    """Index the ``split`` images of a VisA root as the 1cls csv lists them."""
    root = Path(root)
    rows = read_visa_csv(root)
    csv_path = root / SPLIT_CSV
    available = sorted({r["object"] for r in rows})
    selected = select_classes(available, classes, root, _expected(root))
    for cls in selected:
        require_dir(root / cls, _expected(root))
    wanted = set(selected)
    records: list[Record] = []
    for row in rows:
        if row["object"] not in wanted or row["split"].strip() != split:
            continue
        label = _LABELS.get(row["label"].strip().lower())
        if label is None:
            raise UserError(f"{csv_path} line {row['_line']}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
        image = root / row["image"].strip()
        mask = None
        if label == 1:
            if not (row["mask"] or "").strip():
                raise UserError(f"{csv_path} line {row['_line']}: anomalous image {row['image']} has no mask path")
            mask = root / row["mask"].strip()
        rel = Path(row["image"].strip()).as_posix()
        records.append(Record(image, mask, row["object"], label, rel, "anomaly" if label else NORMAL_DEFECT))
    if not records:
        raise UserError(f"{csv_path} lists no {split} images for class(es) {', '.join(selected)}")
    check_files_exist((r.image_path for r in records), "images", str(csv_path))
    check_files_exist((r.mask_path for r in records if r.mask_path is not None), "masks", str(csv_path))
    return records
