"""test.py --use_captions / --test_captions: every test image needs its own caption, checked before any map is made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import test as test_script
from tests import datagen
from tests.tinyckpt import demo_data_and_model
from utils.cli import run_main
from vlmdiff.data import index_dataset

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
    "--batch_size",
    "4",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 2 classes x (2 good + 2 defect) = 8 test images
    tmp, data, ckpt = demo_data_and_model(
        tmp_path_factory.mktemp("captions"), n_train=1, n_test_good=2, n_test_defect=2
    )
    ids = sorted(r.id for r in index_dataset("mvtec", data, "test"))
    assert len(ids) == 8
    return tmp, data, ckpt, ids


def _args(data: Path, ckpt: Path, out: Path, folder: Path, *flags: str) -> list[str]:
    return [
        "--data_set",
        "mvtec",
        "--data_path",
        str(data),
        "--resume_path",
        str(ckpt),
        "--output_dir",
        str(out),
        *flags,
        "--caption_folder",
        str(folder),
        "--vlm_model",
        "template",
        *FAST,
    ]


def _captions(folder: Path, ids: list[str], captions: list[str]) -> Path:
    datagen.write_upstream_captions(folder, "test", "mvtec", "template", ids, captions)
    return folder


def _one_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def _nothing_written(out: Path) -> None:
    assert not (out / "maps").exists() and not (out / "manifest.json").exists()


def test_a_test_image_without_caption_stops_the_run_before_any_map(setup, tmp_path, capsys):
    _, data, ckpt, ids = setup
    missing = ids[5]
    folder = _captions(
        tmp_path / "caps", [i for i in ids if i != missing], [f"a photo of {i}" for i in ids if i != missing]
    )
    out = tmp_path / "out"
    capsys.readouterr()
    line = _one_error(
        capsys, run_main(test_script.main, _args(data, ckpt, out, folder, "--use_captions", "--test_captions"))
    )
    assert f"1 of 8 test images have no caption in {folder}, e.g. {missing} " in line
    assert "captioner.py --split test, or run without --use_captions" in line and "train" not in line
    _nothing_written(out)
    # the captions are checked before the (large) checkpoint is read: a broken checkpoint is not reached
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\0" * 4096)
    line = _one_error(capsys, run_main(test_script.main, _args(data, garbage, out, folder, "--test_captions")))
    assert missing in line and str(garbage) not in line
    _nothing_written(out)


def test_caption_files_that_hold_no_caption_are_an_error_naming_the_folder(setup, tmp_path, capsys):
    _, data, ckpt, _ = setup
    folder = _captions(tmp_path / "caps", [], [])
    out = tmp_path / "out"
    capsys.readouterr()
    line = _one_error(capsys, run_main(test_script.main, _args(data, ckpt, out, folder, "--test_captions")))
    assert line.startswith(f"error: {folder}: no test captions in it") and "8 test images" in line
    _nothing_written(out)


def test_a_blank_caption_counts_as_missing(setup, tmp_path, capsys):
    _, data, ckpt, ids = setup
    folder = _captions(
        tmp_path / "caps", ids, [f"a photo of {i}" for i in ids[:2]] + ["   "] + [f"a photo of {i}" for i in ids[3:]]
    )
    out = tmp_path / "out"
    capsys.readouterr()
    line = _one_error(capsys, run_main(test_script.main, _args(data, ckpt, out, folder, "--test_captions")))
    assert f"1 of 8 test images have an empty caption in {folder}, e.g. {ids[2]} " in line
    _nothing_written(out)


def test_test_captions_is_use_captions(setup, tmp_path):
    _, data, ckpt, ids = setup
    folder = _captions(tmp_path / "caps", ids, [f"a photo of {i}" for i in ids])
    out = tmp_path / "out"
    assert test_script.parse_args(_args(data, ckpt, out, folder, "--test_captions")).use_captions
    assert run_main(test_script.main, _args(data, ckpt, out, folder, "--test_captions")) == 0
    assert json.loads((out / "manifest.json").read_text())["data"]["test_captions"] is True
