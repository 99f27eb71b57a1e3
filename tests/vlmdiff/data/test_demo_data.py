"""The demo generator: a valid MVTec-AD tree, exact masks, byte-identical by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.errors import UserError
from vlmdiff.data import build_dataset, index_dataset
from vlmdiff.data.demo import DEFECTS, SOURCES, _normal_crop, _rng, generate_demo_dataset, load_source_photo, main


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_tree_is_read_by_mvtec_loader_with_aligned_masks(tmp_path: Path) -> None:
    root = generate_demo_dataset(
        tmp_path / "demo", classes=("brick", "coffee"), n_train=4, n_test_good=2, n_test_defect=4, image_size=64, seed=3
    )
    train = index_dataset("mvtec", root, "train")
    test = build_dataset("mvtec", root, "test", image_size=64)
    assert len(train) == 8 and len(test) == 12
    assert test.class_names == ["brick", "coffee"]
    assert {r.defect for r in test.records if r.label} == set(DEFECTS)
    assert Image.open(root / "brick" / "train" / "good" / "000.png").mode == "L"
    assert Image.open(root / "coffee" / "train" / "good" / "000.png").mode == "RGB"
    for cls in ("brick", "coffee"):
        photo = load_source_photo(cls)
        for i in range(4):
            defect, stem = DEFECTS[i % 4], f"{i // 4:03d}"
            clean = _normal_crop(photo, SOURCES[cls][1], 64, _rng(3, cls, "test_defect", i)).astype(int)
            bad = np.asarray(Image.open(root / cls / "test" / defect / f"{stem}.png")).astype(int)
            mask = np.asarray(Image.open(root / cls / "ground_truth" / defect / f"{stem}_mask.png")) > 0
            changed = np.abs(bad - clean).reshape(64, 64, -1).max(-1) > 0
            assert mask.any() and not (changed & ~mask).any(), (cls, defect)  # nothing changes outside the mask
            assert changed[mask].mean() > 0.5, (cls, defect)
    item = test[[r.label for r in test.records].index(1)]
    assert item["mask"].max() == 255 and item["label"] == 1


def test_demo_is_deterministic_by_seed_and_resumable(tmp_path: Path) -> None:
    kw = dict(classes=("gravel", "chelsea"), n_train=2, n_test_good=1, n_test_defect=2, image_size=48)
    a = _files(generate_demo_dataset(tmp_path / "a", seed=1, **kw))
    main(
        [
            "--output",
            str(tmp_path / "b"),
            "--classes",
            "gravel",
            "chelsea",
            "--n_train",
            "2",
            "--n_test_good",
            "1",
            "--n_test_defect",
            "2",
            "--image_size",
            "48",
            "--seed",
            "1",
        ]
    )
    assert a == _files(tmp_path / "b")
    generate_demo_dataset(tmp_path / "a", seed=1, **kw)  # completed: no-op
    assert a == _files(tmp_path / "a")
    c = _files(generate_demo_dataset(tmp_path / "c", seed=2, **kw))
    assert c.keys() == a.keys() and c != a
    with pytest.raises(UserError, match="other parameters"):
        generate_demo_dataset(tmp_path / "a", seed=5, **kw)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate_demo_dataset(tmp_path / "d", **kw)
    with pytest.raises(UserError, match="unknown demo class 'bottle'"):
        generate_demo_dataset(tmp_path / "e", classes=("bottle",))
