"""Dataset indexing and items on tiny trees in each dataset's real layout (tests/datagen.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import datagen
from utils.errors import UserError
from vlmdiff.data import ITEM_KEYS, build_dataset, index_dataset
from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD


def _denorm(img: torch.Tensor) -> torch.Tensor:
    return img * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def _check_item(item: dict, size: int) -> None:
    assert tuple(item) == ITEM_KEYS
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["hint"] is item["image"]
    assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.uint8
    assert isinstance(item["caption"], str) and isinstance(item["filename"], str)
    assert isinstance(item["class_name"], str) and isinstance(item["label"], int)
    if item["label"] != 1:
        assert item["mask"].sum() == 0


def _check_alignment(item: dict) -> None:
    """Anomalous items of datagen trees: mask > 0 exactly on the white defect square."""
    m = item["mask"][0] > 127
    assert m.any()
    bright = _denorm(item["image"]).mean(0) > 0.9
    assert (m == bright).float().mean() > 0.97


def test_mvtec_counts_labels_gray_and_alignment(tmp_path: Path) -> None:
    root = datagen.make_mvtec(
        tmp_path / "mvtec",
        classes=("bottle", "grid"),
        n_train=3,
        n_test_good=2,
        defects=("crack", "hole"),
        n_per_defect=2,
    )
    train = build_dataset("mvtec", root, "train", image_size=32)
    test = build_dataset("mvtec", root, "test", image_size=32)
    assert len(train) == 6 and len(test) == 12
    assert train.class_names == ["bottle", "grid"]
    assert [r.label for r in test.records].count(1) == 8
    assert test.records[0].id == "bottle/test/crack/000.png"
    for i in range(len(test)):
        item = test[i]
        _check_item(item, 32)
        assert item["filename"] == test.records[i].id
        if item["label"] == 1:
            _check_alignment(item)
    gray = train[3]
    assert gray["class_name"] == "grid"
    rgb = _denorm(gray["image"])
    assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)
    only = index_dataset("mvtec", root, "test", classes=["grid"])
    assert {r.class_name for r in only} == {"grid"} and len(only) == 6
    big = build_dataset("mvtec", root, "test", image_size=64, classes=["bottle"])
    item = big[0]
    _check_item(item, 64)
    assert item["mask"].max() == 255


def test_visa_split_csv(tmp_path: Path) -> None:
    root = datagen.make_visa(tmp_path / "visa", classes=("candle", "pcb1"), n_train=3, n_test_good=2, n_test_anomaly=2)
    train = build_dataset("visa", root, "train", image_size=32)
    test = build_dataset("visa", root, "test", image_size=32)
    assert len(train) == 6 and len(test) == 8
    assert sum(r.label for r in test.records) == 4 and all(r.label == 0 for r in train.records)
    assert test.records[-1].id == "pcb1/Data/Images/Anomaly/001.JPG"
    for i in range(len(test)):
        _check_item(test[i], 32)
    _check_alignment(test[len(test) - 1])
    raw = root / "pcb1/Data/Masks/Anomaly/001.png"  # raw VisA masks hold defect indexes, not 255
    Image.fromarray((np.asarray(Image.open(raw)) > 0).astype(np.uint8) * 2).save(raw)
    _check_alignment(test[len(test) - 1])
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(UserError, match="split_csv/1cls.csv"):
        index_dataset("visa", root, "train")


# A 7 x 5 (width x height) VisA-like mask resized to 3 x 3. Every row is [0, 1, 0, 0, 1, 1, 0]: a
# 1-pixel line (column 1) and a 2-pixel band (columns 4-5) of defect index 1. PIL's bilinear filter
# widened to the scale 7/3 gives output column j the input weights (normalised triangle weights
# around the centre (j + 0.5) * 7/3, input pixel centres at x + 0.5):
#   j = 0: x 0..2 -> 0.7143, 0.8571, 0.4286 / 2.0    = 0.3571, 0.4286, 0.2143
#   j = 1: x 1..5 -> 0.1429, 0.5714, 1, 0.5714, 0.1429 / 2.4286 = 0.0588, 0.2353, 0.4118, 0.2353, 0.0588
#   j = 2: x 4..6 -> mirror of j = 0                   = 0.2143, 0.4286, 0.3571
# Rows are constant, so the vertical pass keeps each column's value.
# resize_first (raw values 0/1): j0 = 0.4286 -> 0, j1 = 0.0588 + 0.2353 + 0.0588 = 0.353 -> 0,
#   j2 = 0.2143 + 0.4286 = 0.643 -> 1; so only column 2 is defect: the line is lost.
# binarize_first (0/255): j0 = 109.3 -> 109, j1 = 90.0 -> 90, j2 = 163.9 -> 164: every column is defect.
# With defect index 2 on the line, resize_first gives j0 = 0.857 -> 1: the line survives.
HAND_ROW = [0, 1, 0, 0, 1, 1, 0]


def test_mask_orders_hand_computed() -> None:
    from vlmdiff.data.common import resize_mask

    mask = Image.fromarray(np.array([HAND_ROW] * 5, np.uint8), "L")
    assert resize_mask(mask, 3).tolist() == [[0, 0, 255]] * 3
    assert resize_mask(mask, 3, "binarize_first").tolist() == [[109, 90, 164]] * 3
    index2 = Image.fromarray(np.array([[0, 2, 0, 0, 1, 1, 0]] * 5, np.uint8), "L")
    assert resize_mask(index2, 3).tolist() == [[255, 0, 255]] * 3
    with pytest.raises(UserError, match="mask order 'nearest'"):
        resize_mask(mask, 3, "nearest")


def test_visa_mask_orders_through_the_dataset(tmp_path: Path) -> None:
    root = datagen.make_visa(tmp_path / "visa", classes=("pcb1",), n_train=1, n_test_good=1, n_test_anomaly=1)
    datagen._save(np.zeros((5, 7, 3), np.uint8), root / "pcb1/Data/Images/Anomaly/000.JPG")
    Image.fromarray(np.array([HAND_ROW] * 5, np.uint8), "L").save(root / "pcb1/Data/Masks/Anomaly/000.png")
    upstream = build_dataset("visa", root, "test", image_size=3)
    i = [r.id for r in upstream.records].index("pcb1/Data/Images/Anomaly/000.JPG")
    assert upstream[i]["mask"][0].tolist() == [[0, 0, 255]] * 3
    binarized = build_dataset("visa", root, "test", image_size=3, mask_order="binarize_first")
    assert binarized[i]["mask"][0].tolist() == [[109, 90, 164]] * 3
    with pytest.raises(UserError, match="mask order"):
        build_dataset("visa", root, "test", image_size=3, mask_order="after")


@pytest.mark.parametrize("location", ["nested", "flat"])
def test_realiad_both_json_locations(tmp_path: Path, location: str) -> None:
    root = datagen.make_realiad(
        tmp_path, classes=("audiojack", "toy"), json_location=location, n_train=1, n_test_good=1, n_test_ng=1
    )
    train = index_dataset("real_iad", root, "train")
    test = build_dataset("realiad", root, "test", image_size=32, classes=["toy"])
    assert len(train) == 10 and len(test) == 10
    assert sum(r.label for r in test.records) == 5
    assert test.records[0].id.startswith("toy/OK/S0002/")
    ng = [i for i, r in enumerate(test.records) if r.label == 1]
    assert test.records[ng[0]].defect == "AK"
    _check_item(test[ng[0]], 32)
    _check_alignment(test[ng[0]])


def test_realiad_missing_json_names_both_locations(tmp_path: Path) -> None:
    root = datagen.make_realiad(tmp_path, classes=("toy",))
    shutil.rmtree(tmp_path / "real_iad_jsons")
    with pytest.raises(UserError) as e:
        index_dataset("realiad", root, "train")
    assert "real_iad_jsons/realiad_jsons/toy.json" in str(e.value) and "real_iad_jsons/toy.json" in str(e.value)


def test_coco_ad(tmp_path: Path) -> None:
    root = datagen.make_coco_ad(tmp_path / "coco", part=2)
    train = build_dataset("coco", root, "train", coco_part=2, image_size=32)
    test = build_dataset("coco", root, "test", coco_part=2, image_size=32)
    assert len(train) == 3 and len(test) == 4 and train.class_names == ["coco"]
    assert test.records[0].id == "val2017/000000000100.jpg"
    assert [r.label for r in test.records] == [0, 0, 1, 1]
    _check_item(test[3], 32)
    _check_alignment(test[3])
    with pytest.raises(UserError, match="coco_part"):
        index_dataset("coco", root, "train")
    with pytest.raises(UserError, match="meta_20_1.json"):
        index_dataset("coco", root, "train", coco_part=1)


def test_folder_dataset(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    datagen._save(np.zeros((20, 30, 3), np.uint8), root / "a.png")
    datagen._save(np.zeros((20, 30, 3), np.uint8), root / "parts" / "x" / "b.jpg")
    (root / "notes.txt").write_text("not an image")
    ds = build_dataset("folder", root, "test", image_size=16)
    assert [r.id for r in ds.records] == ["a.png", "parts/x/b.jpg"]
    assert [r.class_name for r in ds.records] == ["folder", "parts"]
    item = ds[1]
    _check_item(item, 16)
    assert item["label"] == -1


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    root.mkdir()
    ramp16 = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256  # 0 .. 65280
    Image.fromarray(ramp16).save(root / "g16.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).convert("P").save(root / "pal.png")
    Image.fromarray(np.full((16, 16), 77, np.uint8), "L").save(root / "gray.png")
    from vlmdiff.data.common import load_rgb

    g16 = np.asarray(load_rgb(root / "g16.png"))
    assert g16.shape == (16, 16, 3) and g16.max() >= 250 and g16.min() == 0  # scaled, not clipped at 255
    assert np.asarray(load_rgb(root / "rgba.png"))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(load_rgb(root / "pal.png")).shape == (16, 16, 3)
    assert np.asarray(load_rgb(root / "gray.png"))[0, 0].tolist() == [77, 77, 77]
    ds = build_dataset("folder", root, "test", image_size=8)
    for i in range(len(ds)):
        _check_item(ds[i], 8)


def test_corrupt_image_and_mask_size_mismatch(tmp_path: Path) -> None:
    root = datagen.make_mvtec(tmp_path / "m", classes=("bottle",), defects=("crack",), size=32)
    ds = build_dataset("mvtec", root, "test", image_size=32)
    bad = root / "bottle" / "test" / "good" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    ids = [r.id for r in ds.records]
    with pytest.raises(UserError, match="good/000.png is corrupt or truncated"):
        ds[ids.index("bottle/test/good/000.png")]
    datagen._save(np.zeros((16, 16), np.uint8), root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(UserError) as e:
        ds[ids.index("bottle/test/crack/000.png")]
    assert "000_mask.png" in str(e.value) and "test/crack/000.png" in str(e.value)


def test_layout_errors_name_path_and_expectation(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown dataset 'mvtech'.*mvtec, visa, realiad, coco, folder"):
        index_dataset("mvtech", tmp_path, "train")
    with pytest.raises(UserError, match=r"does not exist; expected .*/\{class\}/train/good/\*.png"):
        index_dataset("mvtec", tmp_path / "nope", "train")
    visa = datagen.make_visa(tmp_path / "visa")
    with pytest.raises(UserError, match=r"no classes found in .*visa; expected .*train/good"):
        index_dataset("mvtec", visa, "train")
    root = datagen.make_mvtec(tmp_path / "m", classes=("bottle", "grid"))
    with pytest.raises(UserError, match="class\\(es\\) cable not found"):
        index_dataset("mvtec", root, "train", classes=["cable"])
    (root / "grid" / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(UserError, match="grid/ground_truth/hole/000_mask.png"):
        index_dataset("mvtec", root, "test")
    shutil.rmtree(root / "bottle" / "train")
    with pytest.raises(UserError, match="bottle/train does not exist"):
        index_dataset("mvtec", root, "train")
    with pytest.raises(UserError, match="unknown split"):
        index_dataset("mvtec", root, "val")


def test_visa_missing_listed_image(tmp_path: Path) -> None:
    root = datagen.make_visa(tmp_path / "visa", classes=("candle",))
    (root / "candle" / "Data" / "Images" / "Anomaly" / "001.JPG").unlink()
    with pytest.raises(UserError, match="1 images listed by .*1cls.csv not found, e.g. .*Anomaly/001.JPG"):
        index_dataset("visa", root, "test")
    rows = (root / "split_csv" / "1cls.csv").read_text().replace("anomaly,", "broken,", 1)
    (root / "split_csv" / "1cls.csv").write_text(rows)
    with pytest.raises(UserError, match="line .*'broken'"):
        index_dataset("visa", root, "test")


def test_coco_meta_anomalous_without_mask(tmp_path: Path) -> None:
    root = datagen.make_coco_ad(tmp_path / "coco", part=0)
    meta = json.loads((root / "meta_20_0.json").read_text())
    meta["test"]["coco"][-1]["mask_path"] = ""
    (root / "meta_20_0.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="anomalous but has no mask_path"):
        index_dataset("coco", root, "test", coco_part=0)
