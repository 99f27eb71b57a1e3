"""test.py end to end on a tiny model: maps, metrics, visuals; shards, batch sizes, restarts; bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import test as test_script
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff.data.demo import generate_demo_dataset
from vlmdiff.evaluation.map_store import MapStore

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "3",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--metrics_protocol",
    "both",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("testpy"), n_train=2, n_test_good=2, n_test_defect=3)


def _run(data: Path, ckpt: Path, out: Path, *extra: str):
    return test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--resume_path",
            str(ckpt),
            "--output_dir",
            str(out),
            *FAST,
            *extra,
        ]
    )


def _values(result: dict) -> np.ndarray:
    return np.array(
        [
            v
            for p in sorted(result)
            for row in [*result[p]["per_class"].values(), result[p]["mean"]]
            for v in row.values()
        ],
        dtype=float,
    )


@pytest.fixture(scope="module")
def reference(setup):
    tmp, data, ckpt = setup
    out = tmp / "full"
    return out, _run(data, ckpt, out, "--batch_size", "4", "--save_visuals")


def test_output_that_is_not_a_terminal_gets_progress_lines_and_a_summary(setup, capsys):
    tmp, data, ckpt = setup
    out = tmp / "lines"
    args = [a for a in FAST if a != "--no_progress_bar"]  # pytest captures stderr: not a terminal
    test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--resume_path",
            str(ckpt),
            "--output_dir",
            str(out),
            "--classes",
            "brick",
            "--batch_size",
            "2",
            "--log_interval",
            "0",
            *args,
        ]
    )
    captured = capsys.readouterr()
    counts = re.findall(
        r"test: img (\d)/5 \(\d+%\) \| [\d.]+ (?:img/s|s/img) \| elapsed [\d:]+ \| ETA [\d:]+", captured.err
    )
    assert counts == ["2", "4", "5"]  # a line per batch at --log_interval 0
    assert "\r" not in captured.err
    assert f"metrics: {out / 'metrics.json'} (also metrics.csv, metrics.md)\nmaps: {out / 'maps'}" in captured.out


def test_full_run_writes_everything(reference):
    out, result = reference
    assert set(result) == {"official", "legacy"}
    assert set(result["official"]["per_class"]) == {"brick", "coffee"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["official"]["mean"] == pytest.approx(result["official"]["mean"], nan_ok=True)
    assert saved["provenance"]["git_commit"] is None or len(saved["provenance"]["git_commit"]) >= 40
    assert (out / "metrics.csv").read_text().count("\n") == 2 * 4 + 1  # 2 protocols x (2 classes, mean, count)
    assert "paper (mvtec, legacy protocol)" in (out / "metrics.md").read_text()
    store = MapStore(out / "maps")
    assert len(store.scored_ids()) == 10
    classes = dict(store.iter_classes())
    assert classes["brick"]["maps"].shape == (5, 128, 128) and classes["brick"]["masks"].dtype == np.uint8
    pngs = sorted((out / "visuals").rglob("*.png"))
    assert len(pngs) == 10
    from PIL import Image

    w, h = Image.open(pngs[0]).size
    assert w > 6 * 256 and h > 256  # titled 256-px panels: input | autoencoder | reconstruction | map | overlay | mask
    upstream = sorted(p.name for p in (out / "log_image_vlmdiff_mvtec").iterdir())  # upstream's files, too
    assert len(upstream) == 10 * 5 and sum(n.endswith("-heatmap.png") for n in upstream) == 10


def test_shards_merge_and_batch_size(setup, reference):
    tmp, data, ckpt = setup
    ref = _values(reference[1])
    out = tmp / "sharded"
    assert _run(data, ckpt, out, "--batch_size", "3", "--start_ind", "0", "--end_ind", "4") is None
    with pytest.raises(UserError, match="no map yet"):
        _run(data, ckpt, out, "--run_eval_only")
    _run(data, ckpt, out, "--batch_size", "1", "--start_ind", "4")
    merged = _run(data, ckpt, out, "--run_eval_only")
    np.testing.assert_allclose(_values(merged), ref, atol=1e-6, equal_nan=True)
    single = _run(data, ckpt, tmp / "bs1", "--batch_size", "1")
    np.testing.assert_allclose(_values(single), ref, atol=1e-6, equal_nan=True)
    for (c1, a), (c2, b) in zip(
        MapStore(tmp / "bs1" / "maps").iter_classes(), MapStore(reference[0] / "maps").iter_classes(), strict=True
    ):
        assert c1 == c2 and np.array_equal(a["ids"], b["ids"])
        assert np.array_equal(a["maps"], b["maps"])  # bit-identical maps for batch sizes 1 and 4


def test_other_run_folder_and_bad_input(setup, reference, tmp_path):
    tmp, data, ckpt = setup
    out, _ = reference
    with pytest.raises(UserError, match="another run"):
        _run(data, ckpt, out, "--ddim_steps", "4")
    assert json.loads((out / "manifest.json").read_text())["data"]["mask_order"] == "resize_first"
    with pytest.raises(UserError, match="data.mask_order: 'resize_first' there, 'binarize_first' now"):
        _run(data, ckpt, out, "--mask_order", "binarize_first")  # its stored masks were made the other way
    with pytest.raises(UserError, match="another model config"):
        _run(data, ckpt, tmp_path / "o1", "--config", "tiny", "unet.num_heads=2")
    bad_weights = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, bad_weights)
    with pytest.raises(UserError, match="resnet.pth"):
        test_script.main(
            [
                "--data_set",
                "mvtec",
                "--data_path",
                str(data),
                "--resume_path",
                str(ckpt),
                "--output_dir",
                str(tmp_path / "o2"),
                "--feature_extractor",
                "resnet50",
                "--feature_weights",
                str(bad_weights),
                "--num_workers",
                "0",
                "--device",
                "cpu",
            ]
        )
    no_masks = tmp_path / "nomask"
    generate_demo_dataset(no_masks, classes=("brick",), n_train=1, n_test_good=1, n_test_defect=1, image_size=64)
    for m in (no_masks / "brick" / "ground_truth").rglob("*.png"):
        m.unlink()
    with pytest.raises(UserError, match="mask"):
        _run(no_masks, ckpt, tmp_path / "o3")
    with pytest.raises(UserError, match="--start_ind"):
        _run(data, ckpt, tmp_path / "o4", "--start_ind", "7", "--end_ind", "3")


def test_use_captions_guides_mvtec_test_images_by_their_captions(setup, reference):
    import captioner

    tmp, data, ckpt = setup
    captioner.main(["--data_set", "mvtec", "--data_path", str(data), "--vlm_model", "template", "--split", "test"])
    out = tmp / "captioned"
    guided = _run(data, ckpt, out, "--batch_size", "4", "--use_captions", "--vlm_model", "template")
    assert json.loads((out / "manifest.json").read_text())["data"]["test_captions"] is True
    maps = dict(MapStore(out / "maps").iter_classes())
    plain = dict(MapStore(reference[0] / "maps").iter_classes())
    assert not np.array_equal(maps["brick"]["maps"], plain["brick"]["maps"])  # the captions changed the samples
    assert set(guided) == set(reference[1])


def test_folder_of_images_without_ground_truth(setup, tmp_path):
    tmp, data, ckpt = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in list((data / "brick" / "test").rglob("*.png"))[:3]:
        (folder / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / "folder_run"
    assert (
        test_script.main(
            [
                "--data_set",
                "folder",
                "--data_path",
                str(folder),
                "--resume_path",
                str(ckpt),
                "--output_dir",
                str(out),
                *FAST,
            ]
        )
        is None
    )
    rows = (out / "scores.csv").read_text().strip().splitlines()
    assert rows[0].startswith("id,class,label,image_score") and len(rows) == 4
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(setup, reference):
    tmp, data, ckpt = setup
    out = tmp / "killed"
    args = [
        sys.executable,
        "test.py",
        "--data_set",
        "mvtec",
        "--data_path",
        str(data),
        "--resume_path",
        str(ckpt),
        "--output_dir",
        str(out),
        *FAST,
        "--batch_size",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while len(list((out / "maps").rglob("*.npz"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = len(MapStore(out / "maps").scored_ids())
    assert 3 <= partial < 10
    result = _run(data, ckpt, out, "--batch_size", "4")
    np.testing.assert_allclose(_values(result), _values(reference[1]), atol=1e-6, equal_nan=True)
    assert len(list((out / "maps").rglob("*.npz"))) >= 3
    assert not list(out.rglob("*.tmp"))  # no temporary files survive into the result
