"""Tiny dataset trees in each dataset's real on-disk layout, for tests.

Every writer is deterministic (seeded), uses small images (default 32 px) and returns the dataset
root to pass as ``--data_path``. Anomalous images carry a white square defect exactly where their
mask is 255, so tests can check mask alignment:

- :func:`make_mvtec`: ``{root}/{class}/train/good``, ``test/{good,<defect>}``, ``ground_truth``;
  classes in ``gray_classes`` are written as 8-bit grayscale PNGs (like MVTec's grid/screw/zipper).
- :func:`make_visa`: ``{class}/Data/Images/{Normal,Anomaly}/*.JPG``, ``Data/Masks/Anomaly/*.png``
  and ``split_csv/1cls.csv``.
- :func:`make_realiad`: ``{parent}/realiad_1024/{class}/{OK,NG/<defect>}/S..../*.jpg`` (5 views per
  sample), masks beside the NG images, JSON at either upstream location.
- :func:`make_coco_ad`: ``train2017/``, ``val2017/``, ``meta_20_{p}.json``, ``val2017_mask_ad_20_{p}/``.
- :func:`make_coco_instances`: a COCO-2017-like root with ``annotations/instances_*2017.json`` for
  ``utils/prepare_coco_ad.py``.
- :func:`write_upstream_captions`: upstream caption/label JSON pairs, optionally sharded/shuffled.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFECT_BOX = (0.25, 0.5)  # defect square: from 25% to 50% of the side, in both axes


def _image(rng: np.random.Generator, size: int, gray: bool = False, defect: bool = False) -> np.ndarray:
    base = rng.integers(40, 140, size=(size, size) if gray else (size, size, 3)).astype(np.uint8)
    if defect:
        a, b = int(DEFECT_BOX[0] * size), int(DEFECT_BOX[1] * size)
        base[a:b, a:b] = 255
    return base


def defect_mask(size: int) -> np.ndarray:
    """The 0/255 mask of the defect square that anomalous test images carry."""
    m = np.zeros((size, size), dtype=np.uint8)
    a, b = int(DEFECT_BOX[0] * size), int(DEFECT_BOX[1] * size)
    m[a:b, a:b] = 255
    return m


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else Image.fromarray(
        arr
    ).save(path)


def make_mvtec(
    root: str | Path,
    classes: Sequence[str] = ("bottle", "grid"),
    n_train: int = 3,
    n_test_good: int = 2,
    defects: Sequence[str] = ("crack", "hole"),
    n_per_defect: int = 1,
    size: int = 32,
    gray_classes: Sequence[str] = ("grid",),
    seed: int = 0,
) -> Path:
    """MVTec-AD tree; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in classes:
        gray = cls in gray_classes
        for i in range(n_train):
            _save(_image(rng, size, gray), root / cls / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            _save(_image(rng, size, gray), root / cls / "test" / "good" / f"{i:03d}.png")
        for d in defects:
            for i in range(n_per_defect):
                _save(_image(rng, size, gray, defect=True), root / cls / "test" / d / f"{i:03d}.png")
                _save(defect_mask(size), root / cls / "ground_truth" / d / f"{i:03d}_mask.png")
    return root


def make_visa(
    root: str | Path,
    classes: Sequence[str] = ("candle", "pcb1"),
    n_train: int = 3,
    n_test_good: int = 2,
    n_test_anomaly: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """VisA tree with ``split_csv/1cls.csv``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for cls in classes:
        for i in range(n_train + n_test_good):
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            _save(_image(rng, size), root / rel)
            rows.append([cls, "train" if i < n_train else "test", "normal", rel, ""])
        for i in range(n_test_anomaly):
            rel, mrel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG", f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            _save(_image(rng, size, defect=True), root / rel)
            _save(defect_mask(size), root / mrel)
            rows.append([cls, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def make_realiad(
    parent: str | Path,
    classes: Sequence[str] = ("audiojack", "toy"),
    json_location: str = "nested",
    n_train: int = 1,
    n_test_good: int = 1,
    n_test_ng: int = 1,
    views: int = 5,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Real-IAD tree ``{parent}/realiad_1024``; JSON under ``{parent}/real_iad_jsons/realiad_jsons``
    (``json_location="nested"``) or ``{parent}/real_iad_jsons`` ("flat"). Returns the image root."""
    parent = Path(parent)
    root = parent / "realiad_1024"
    jdir = parent / "real_iad_jsons" / ("realiad_jsons" if json_location == "nested" else "")
    rng = np.random.default_rng(seed)
    for cls in classes:
        doc: dict = {"meta": {"prefix": "", "normal_class": "OK"}, "train": [], "test": []}
        sample = 0
        for split, n, ng in (("train", n_train, False), ("test", n_test_good, False), ("test", n_test_ng, True)):
            for _ in range(n):
                sample += 1
                for v in range(1, views + 1):
                    if ng:
                        rel = f"NG/AK/S{sample:04d}/{cls}_{sample:04d}_NG_AK_C{v}_20230101.jpg"
                        mrel = rel[:-4] + ".png"
                        _save(_image(rng, size, defect=True), root / cls / rel)
                        _save(defect_mask(size), root / cls / mrel)
                        doc[split].append(
                            {"category": cls, "anomaly_class": "AK", "image_path": rel, "mask_path": mrel}
                        )
                    else:
                        rel = f"OK/S{sample:04d}/{cls}_{sample:04d}_OK_C{v}_20230101.jpg"
                        _save(_image(rng, size), root / cls / rel)
                        doc[split].append(
                            {"category": cls, "anomaly_class": "OK", "image_path": rel, "mask_path": None}
                        )
        jdir.mkdir(parents=True, exist_ok=True)
        (jdir / f"{cls}.json").write_text(json.dumps(doc))
    return root


def make_coco_ad(
    root: str | Path,
    part: int = 0,
    n_train: int = 3,
    n_test_normal: int = 2,
    n_test_anomaly: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """COCO-AD tree (images, ``meta_20_{part}.json``, masks); returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    meta: dict = {"train": {"coco": []}, "test": {"coco": []}}
    for i in range(n_train):
        rel = f"train2017/{i + 1:012d}.jpg"
        _save(_image(rng, size), root / rel)
        meta["train"]["coco"].append(
            {"img_path": rel, "mask_path": "", "cls_name": "coco", "specie_name": "", "anomaly": 0}
        )
    for i in range(n_test_normal + n_test_anomaly):
        anomalous = i >= n_test_normal
        rel = f"val2017/{i + 100:012d}.jpg"
        _save(_image(rng, size, defect=anomalous), root / rel)
        mrel = ""
        if anomalous:
            mrel = f"val2017_mask_ad_20_{part}/{i + 100:012d}.png"
            _save(defect_mask(size), root / mrel)
        meta["test"]["coco"].append(
            {
                "img_path": rel,
                "mask_path": mrel,
                "cls_name": "coco",
                "specie_name": "dog" if anomalous else "",
                "anomaly": int(anomalous),
            }
        )
    (root / f"meta_20_{part}.json").write_text(json.dumps(meta))
    return root


def make_coco_instances(root: str | Path, n_categories: int = 80, size: int = 24) -> Path:
    """A COCO-2017-like root with ``annotations/instances_{train,val}2017.json`` and images.

    Category ids are 1..90 with gaps, like COCO (the contiguous index of a category is its position in
    sorted id order). Images (id: their role):

    - train 1: category at index 0 (held out by part 0); train 2: index 25 (part 1);
      train 3: index 79 (part 3); train 4: no annotation at all; train 5: indexes 19 and 40;
    - val 11: index 5 (one square, part 0); val 12: index 5 + index 30 (two squares: part 0 masks
      the first, part 1 the second); val 13: index 60 (part 3); val 14: no annotation (not listed).

    Boxes/polygons are axis-aligned squares, so the union masks are known exactly.
    """
    root = Path(root)
    cat_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)][:n_categories]
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "thing"} for c in cat_ids]

    def ann(aid: int, img: int, idx: int, box: tuple[int, int, int, int]) -> dict:
        x, y, w, h = box
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        return {
            "id": aid,
            "image_id": img,
            "category_id": cat_ids[idx],
            "segmentation": [poly],
            "area": float(w * h),
            "bbox": [x, y, w, h],
            "iscrowd": 0,
        }

    specs = {
        "train": ({1: [0], 2: [25], 3: [79], 4: [], 5: [19, 40]}, {}),
        "val": ({11: [5], 12: [5, 30], 13: [60], 14: []}, {12: [(2, 2, 8, 8), (12, 12, 8, 8)]}),
    }
    rng = np.random.default_rng(0)
    aid = 1
    for split, (images, boxes) in specs.items():
        doc: dict = {"images": [], "annotations": [], "categories": cats}
        for img_id, idxs in images.items():
            name = f"{img_id:012d}.jpg"
            _save(rng.integers(0, 255, size=(size, size, 3)).astype(np.uint8), root / f"{split}2017" / name)
            doc["images"].append({"id": img_id, "file_name": name, "width": size, "height": size})
            for k, idx in enumerate(idxs):
                box = boxes.get(img_id, [(4, 4, 10, 10)] * len(idxs))[k]
                doc["annotations"].append(ann(aid, img_id, idx, box))
                aid += 1
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root


def write_upstream_captions(
    folder: str | Path,
    split: str,
    dataset: str,
    vlm: str,
    ids: Sequence[str],
    captions: Sequence[str],
    shards: int = 1,
    shuffle_seed: int | None = None,
) -> list[Path]:
    """Write upstream caption/label JSON pairs (``_{start}_{end}`` shard suffixes when ``shards`` > 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(ids)))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    bounds = np.linspace(0, len(order), shards + 1).astype(int)
    written = []
    for s in range(shards):
        part = order[bounds[s] : bounds[s + 1]]
        suffix = "" if shards == 1 else f"_{bounds[s]}_{bounds[s + 1]}"
        cap = folder / f"{split}_captions_{dataset}_{vlm}{suffix}.json"
        cap.write_text(json.dumps([captions[i] for i in part]))
        (folder / f"{split}_labels_{dataset}_{vlm}{suffix}.json").write_text(json.dumps([ids[i] for i in part]))
        written.append(cap)
    return written
