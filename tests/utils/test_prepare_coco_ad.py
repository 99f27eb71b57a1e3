"""utils/prepare_coco_ad.py on a tiny synthetic COCO: membership per part, union masks, ADer's rasterisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import datagen
from utils.errors import UserError
from utils.prepare_coco_ad import instance_mask, main
from vlmdiff.data import build_dataset


def _meta(root: Path, part: int) -> dict:
    return json.loads((root / f"meta_20_{part}.json").read_text())


def _square(x: int, y: int, w: int, h: int, size: int = 24) -> np.ndarray:
    """The pixels fillPoly gives the polygon (x, y) (x+w, y) (x+w, y+h) (x, y+h): both borders included."""
    m = np.zeros((size, size), bool)
    m[y : y + h + 1, x : x + w + 1] = True
    return m


def _check_mask(path: Path, expected: np.ndarray) -> None:
    m = np.asarray(Image.open(path))
    assert set(np.unique(m)) <= {0, 255}
    assert np.array_equal(m > 0, expected)


def test_membership_and_masks_per_part(tmp_path: Path) -> None:
    root = datagen.make_coco_instances(tmp_path / "coco")
    main(["--coco_root", str(root)])
    train = {p: sorted(int(Path(i["img_path"]).stem) for i in _meta(root, p)["train"]["coco"]) for p in range(4)}
    # train 4 has no annotation: ADer lists only annotated images, so it is in no part
    assert train == {0: [2, 3], 1: [1, 3, 5], 2: [1, 2, 3], 3: [1, 2, 5]}
    anomalous = {
        p: {int(Path(i["img_path"]).stem): i["anomaly"] for i in _meta(root, p)["test"]["coco"]} for p in range(4)
    }
    assert anomalous == {
        0: {11: 1, 12: 1, 13: 0},
        1: {11: 0, 12: 1, 13: 0},
        2: {11: 0, 12: 0, 13: 0},
        3: {11: 0, 12: 0, 13: 1},
    }
    item = _meta(root, 0)["test"]["coco"][0]
    assert item == {
        "img_path": "val2017/000000000011.jpg",
        "mask_path": "val2017_mask_ad_20_0/000000000011.png",
        "cls_name": "coco",
        "specie_name": "cat6",
        "anomaly": 1,
    }
    assert _meta(root, 0)["test"]["coco"][2]["mask_path"] == ""
    assert _meta(root, 0)["train"]["coco"][0]["img_path"] == "train2017/000000000002.jpg"
    _check_mask(root / "val2017_mask_ad_20_0/000000000011.png", _square(4, 4, 10, 10))
    _check_mask(root / "val2017_mask_ad_20_0/000000000012.png", _square(2, 2, 8, 8))  # only the held-out one
    _check_mask(root / "val2017_mask_ad_20_1/000000000012.png", _square(12, 12, 8, 8))
    assert not (root / "val2017_mask_ad_20_2").exists()
    ds = build_dataset("coco", root, "test", coco_part=1, image_size=24)
    assert [it["label"] for it in ds] == [0, 1, 0]
    assert (ds[1]["mask"][0] > 0).numpy().sum() == 81  # the 9 x 9 pixels of the second square


def test_union_of_several_held_out_instances(tmp_path: Path) -> None:
    root = datagen.make_coco_instances(tmp_path / "coco")
    ann = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    cat5 = ann["annotations"][0]["category_id"]
    ann["annotations"].append(
        {
            "id": 99,
            "image_id": 11,
            "category_id": cat5,
            "iscrowd": 0,
            "area": 16.0,
            "bbox": [18, 18, 4, 4],
            "segmentation": [[18, 18, 22, 18, 22, 22, 18, 22]],
        }
    )
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    main(["--coco_root", str(root), "--parts", "0"])
    _check_mask(root / "val2017_mask_ad_20_0/000000000011.png", _square(4, 4, 10, 10) | _square(18, 18, 4, 4))
    assert not (root / "meta_20_1.json").exists()


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="train2017 not found"):
        main(["--coco_root", str(tmp_path)])
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    with pytest.raises(UserError, match="expected .*annotations/instances_train2017.json"):
        main(["--coco_root", str(tmp_path)])


def test_polygons_are_filled_on_truncated_vertices() -> None:
    """Vertices (1.7, 1.2) (6.9, 1.8) (1.3, 6.6) truncate to (1, 1) (6, 1) (1, 6): the right triangle whose
    row y (1..6) holds x = 1 .. 7 - y, borders included (21 pixels). Rounding the vertices instead, or
    pycocotools' own rasteriser, gives other pixels."""
    got = instance_mask({"id": 1, "segmentation": [[1.7, 1.2, 6.9, 1.8, 1.3, 6.6]]}, 8, 8)
    expected = np.zeros((8, 8), bool)
    for y in range(1, 7):
        expected[y, 1 : 8 - y] = True
    assert np.array_equal(got, expected) and expected.sum() == 21
    two = instance_mask({"id": 2, "segmentation": [[0, 0, 1, 0, 1, 1, 0, 1], [5.5, 5.5, 7.9, 5.5, 7.9, 7.9]]}, 8, 8)
    expected = np.zeros((8, 8), bool)
    expected[0:2, 0:2] = True  # the unit square with both borders
    expected[5, 5:8] = expected[6, 6:8] = expected[7, 7] = True  # (5, 5) (7, 5) (7, 7)
    assert np.array_equal(two, expected)
    with pytest.raises(UserError, match="annotation 3: a polygon needs an even number"):
        instance_mask({"id": 3, "segmentation": [[1, 2, 3, 4, 5]]}, 8, 8)


def test_rle_regions_are_decoded() -> None:
    """Uncompressed RLE is column-major: counts [5, 3, 8] on 4 x 4 = 5 zeros, 3 ones (column 1, rows 1..3)."""
    got = instance_mask({"id": 1, "iscrowd": 1, "segmentation": {"counts": [5, 3, 8], "size": [4, 4]}}, 4, 4)
    expected = np.zeros((4, 4), bool)
    expected[1:4, 1] = True
    assert np.array_equal(got, expected)
    from pycocotools import mask as mask_utils

    compressed = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()  # as JSON stores it
    assert np.array_equal(instance_mask({"id": 2, "segmentation": compressed}, 4, 4), expected)
