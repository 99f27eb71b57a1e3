"""Make the COCO-AD benchmark files (ADer's ``meta_20_{p}.json`` + masks) from COCO 2017, with pycocotools only.

Input: ``--coco_root`` holding ``annotations/instances_{train,val}2017.json`` and the ``train2017/``
and ``val2017/`` image folders. Output, in the same root, for each part p (default 0..3):

- ``meta_20_{p}.json`` = ``{"train": {"coco": [...]}, "test": {"coco": [...]}}`` with items
  ``{img_path, mask_path, cls_name: "coco", specie_name, anomaly}``;
- ``val2017_mask_ad_20_{p}/{image stem}.png``: 0/255 masks of the anomalous test images.

Rules, those of ADer's generator that produced the published COCO-AD files: the contiguous label
index of a category is its position in sorted category-id order; part p holds out indexes
20p..20p+19 as anomalies. Only images with at least one annotation exist (ADer iterates the COCO
index's image-to-annotations table). Train = every annotated train2017 image with no instance of a
held-out category. Test = every annotated val2017 image; it is anomalous iff a held-out category is
present, and its mask is the union of all held-out instances (crowd regions included). Polygons are
rasterised as ADer does, with OpenCV ``fillPoly`` on vertices truncated to integers (so a vertex at
x = 3.9 lands on pixel 3), one polygon at a time; RLE regions are decoded and taken where > 0.5.
Normal test images have ``mask_path`` "".

Decisions: ``img_path`` and ``mask_path`` are relative to the root with forward slashes
("train2017/000000000009.jpg", as ADer writes them); ``specie_name`` is "" for normal images and the
held-out category names present, sorted and joined with ",", for anomalous ones.

Usage: python utils/prepare_coco_ad.py --coco_root data/coco
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from utils.cli import HelpFormatter, run_main, setup_logging
from utils.errors import UserError
from utils.io import write_bytes, write_json

logger = logging.getLogger("prepare_coco_ad")
PART_SIZE = 20


def load_coco(path: Path):  # -> pycocotools.coco.COCO
    """Load an instances file quietly; a missing/malformed file is a UserError naming it."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise UserError(f"COCO annotations not found: expected {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a COCO instances file ({e})") from e


def held_out(cat_ids: Sequence[int], part: int) -> set[int]:
    """Category ids of the contiguous indexes 20*part .. 20*part+19 (sorted-id order)."""
    ids = sorted(cat_ids)[PART_SIZE * part : PART_SIZE * (part + 1)]
    if not ids:
        raise UserError(f"part {part} holds out no category: the annotations have only {len(cat_ids)} categories")
    return set(ids)


def instance_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """The pixels of one COCO instance, bool (height, width), rasterised as ADer's generator does.

    Polygons (a list of flat ``[x0, y0, x1, y1, ...]`` lists): each filled with ``cv2.fillPoly`` on
    its vertices truncated to int64. RLE (a dict, compressed or not): decoded, then > 0.5.
    """
    import cv2
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    if isinstance(seg, list):
        canvas = np.zeros((height, width), dtype=np.uint8)
        for poly in seg:
            if len(poly) < 6 or len(poly) % 2:
                raise UserError(
                    f"annotation {ann.get('id')}: a polygon needs an even number (>= 6) of coordinates, "
                    f"got {len(poly)}; fix or remove it in the instances file"
                )
            cv2.fillPoly(canvas, [np.array(poly).reshape(-1, 2).astype(np.int64)], 1)
        return canvas > 0
    if isinstance(seg, dict) and "counts" in seg:
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
        return mask_utils.decode(rle) > 0.5
    raise UserError(f"annotation {ann.get('id')}: segmentation is neither polygons nor RLE ({type(seg).__name__})")


def _mask_png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def build_part(train, val, part: int, root: Path) -> dict:
    """The meta dict of one part; writes its masks under ``root``."""
    held = held_out(train.getCatIds(), part)
    names = {c["id"]: c["name"] for c in val.loadCats(val.getCatIds())}
    mask_dir = f"val2017_mask_ad_20_{part}"
    train_items = []
    for img_id in sorted(train.imgToAnns):  # annotated images only, as ADer
        cats = {a["category_id"] for a in train.imgToAnns[img_id]}
        if cats and not cats & held:
            name = train.imgs[img_id]["file_name"]
            train_items.append(
                {"img_path": f"train2017/{name}", "mask_path": "", "cls_name": "coco", "specie_name": "", "anomaly": 0}
            )
    test_items = []
    for img_id in sorted(val.imgToAnns):  # annotated images only, as ADer
        anns = val.imgToAnns[img_id]
        if not anns:
            continue
        info = val.imgs[img_id]
        bad = [a for a in anns if a["category_id"] in held]
        item = {
            "img_path": f"val2017/{info['file_name']}",
            "mask_path": "",
            "cls_name": "coco",
            "specie_name": "",
            "anomaly": 0,
        }
        if bad:
            mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
            for a in bad:
                mask[instance_mask(a, info["height"], info["width"])] = 255
            rel = f"{mask_dir}/{Path(info['file_name']).stem}.png"
            write_bytes(root / rel, _mask_png(mask))
            item.update(mask_path=rel, anomaly=1, specie_name=",".join(sorted({names[a["category_id"]] for a in bad})))
        test_items.append(item)
    n_bad = sum(i["anomaly"] for i in test_items)
    logger.info(
        "part %d: %d train images, %d test images (%d anomalous)", part, len(train_items), len(test_items), n_bad
    )
    return {"train": {"coco": train_items}, "test": {"coco": test_items}}


def prepare(root: Path, parts: Sequence[int]) -> list[Path]:
    """Write the meta files and masks of ``parts`` into ``root``; returns the meta paths."""
    for folder in ("train2017", "val2017"):
        if not (root / folder).is_dir():
            raise UserError(
                f"{root / folder} not found; expected the COCO 2017 image folders train2017/ and val2017/ "
                f"in --coco_root {root}"
            )
    train = load_coco(root / "annotations" / "instances_train2017.json")
    val = load_coco(root / "annotations" / "instances_val2017.json")
    if sorted(train.getCatIds()) != sorted(val.getCatIds()):
        raise UserError("instances_train2017.json and instances_val2017.json list different categories")
    if len(train.getCatIds()) != 80:
        logger.warning("%d categories instead of COCO's 80: parts hold out what exists", len(train.getCatIds()))
    written = []
    for part in parts:
        meta = build_part(train, val, part, root)
        path = root / f"meta_20_{part}.json"
        write_json(path, meta, indent=None)  # written after its masks: a meta file never names a missing mask
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--coco_root", required=True, help="COCO 2017 root (annotations/, train2017/, val2017/)")
    p.add_argument(
        "--parts",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3],
        choices=[0, 1, 2, 3],
        help="which of the four COCO-AD parts to write",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.verbose)
    for path in prepare(Path(args.coco_root), args.parts):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    sys.exit(run_main(main))
