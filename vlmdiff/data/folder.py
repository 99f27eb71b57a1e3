"""A plain folder of images without ground truth (``--data_set folder``).

Every image under the root (recursively, hidden files skipped) is one record with label -1 and no
mask. The class of an image is the name of the first sub-folder it lies in below the root, or
"folder" for images directly in the root; so a root with one sub-folder per product gives
per-class results. The split is ignored: train and test list the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from vlmdiff.data.common import Record, list_images, relative_id, require_dir, select_classes

FOLDER_CLASS = "folder"


def index_folder(root: str | Path, split: str, classes: Sequence[str] | None = None) -> list[Record]:
    """Index all images below ``root`` (``split`` is accepted for symmetry and ignored)."""
    root = Path(root)
    require_dir(root, f"a folder of images ({root}/*.png, *.jpg, ... or in sub-folders)")
    images = [
        p
        for p in list_images(root, recursive=True)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not images:
        raise UserError(f"no images found below {root}; expected *.png, *.jpg, *.jpeg, *.bmp, *.tif or *.webp files")
    records = []
    for p in images:
        rel = p.relative_to(root).parts
        cls = rel[0] if len(rel) > 1 else FOLDER_CLASS
        records.append(Record(p, None, cls, -1, relative_id(p, root), ""))
    available = sorted({r.class_name for r in records})
    selected = set(select_classes(available, classes, root, "a folder of images"))
    return [r for r in records if r.class_name in selected]
