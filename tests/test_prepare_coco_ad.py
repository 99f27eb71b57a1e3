"""utils/prepare_coco_ad.py on a tiny synthetic COCO: membership per part and union masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import datagen
from utils.errors import UserError
from utils.prepare_coco_ad import main
from vlmdiff.data import build_dataset


def _meta(root: Path, part: int) -> dict:
    return json.loads((root / f"meta_20_{part}.json").read_text())


def _square(x: int, y: int, w: int, h: int, size: int = 24) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y:y + h, x:x + w] = True
    return m


def _check_mask(path: Path, expected: np.ndarray) -> None:
    m = np.asarray(Image.open(path))
    assert set(np.unique(m)) <= {0, 255}
    got = m > 0
    # polygon rasterisation may differ by one pixel on the border; the interior and the outside are exact
    inner = np.zeros_like(expected)
    ys, xs = np.nonzero(expected)
    inner[ys.min() + 1:ys.max(), xs.min() + 1:xs.max()] = True
    grown = np.zeros_like(expected)
    grown[max(ys.min() - 1, 0):ys.max() + 2, max(xs.min() - 1, 0):xs.max() + 2] = True
    assert got[inner].all() and not got[~grown].any()


def test_membership_and_masks_per_part(tmp_path: Path) -> None:
    root = datagen.make_coco_instances(tmp_path / "coco")
    main(["--coco_root", str(root)])
    train = {p: sorted(int(Path(i["img_path"]).stem) for i in _meta(root, p)["train"]["coco"]) for p in range(4)}
    assert train == {0: [2, 3, 4], 1: [1, 3, 4, 5], 2: [1, 2, 3, 4], 3: [1, 2, 4, 5]}
    anomalous = {p: {int(Path(i["img_path"]).stem): i["anomaly"] for i in _meta(root, p)["test"]["coco"]}
                 for p in range(4)}
    assert anomalous == {0: {11: 1, 12: 1, 13: 0}, 1: {11: 0, 12: 1, 13: 0}, 2: {11: 0, 12: 0, 13: 0},
                         3: {11: 0, 12: 0, 13: 1}}
    item = _meta(root, 0)["test"]["coco"][0]
    assert item == {"img_path": "val2017/000000000011.jpg", "mask_path": "val2017_mask_ad_20_0/000000000011.png",
                    "cls_name": "coco", "specie_name": "cat6", "anomaly": 1}
    assert _meta(root, 0)["test"]["coco"][2]["mask_path"] == ""
    assert _meta(root, 0)["train"]["coco"][0]["img_path"] == "train2017/000000000002.jpg"
    _check_mask(root / "val2017_mask_ad_20_0/000000000011.png", _square(4, 4, 10, 10))
    _check_mask(root / "val2017_mask_ad_20_0/000000000012.png", _square(2, 2, 8, 8))  # only the held-out one
    _check_mask(root / "val2017_mask_ad_20_1/000000000012.png", _square(12, 12, 8, 8))
    assert not (root / "val2017_mask_ad_20_2").exists()
    ds = build_dataset("coco", root, "test", coco_part=1, image_size=24)
    assert [it["label"] for it in ds] == [0, 1, 0]
    assert (ds[1]["mask"][0] > 0).numpy().sum() >= 36


def test_union_of_several_held_out_instances(tmp_path: Path) -> None:
    root = datagen.make_coco_instances(tmp_path / "coco")
    ann = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    cat5 = ann["annotations"][0]["category_id"]
    ann["annotations"].append({"id": 99, "image_id": 11, "category_id": cat5, "iscrowd": 0, "area": 16.0,
                               "bbox": [18, 18, 4, 4], "segmentation": [[18, 18, 22, 18, 22, 22, 18, 22]]})
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    main(["--coco_root", str(root), "--parts", "0"])
    m = np.asarray(Image.open(root / "val2017_mask_ad_20_0/000000000011.png")) > 0
    assert m[6:12, 6:12].all() and m[19:21, 19:21].all() and not m[15:17, 15:17].any()
    assert not (root / "meta_20_1.json").exists()


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train2017 not found"):
        main(["--coco_root", str(tmp_path)])
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    with pytest.raises(UserError, match="expected .*annotations/instances_train2017.json"):
        main(["--coco_root", str(tmp_path)])
