"""python -m vlmdiff.export: weights-only safetensors of a trained run that test.py loads (same maps)."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import test as test_script
import train
from ldm.checkpoint import load_checkpoint
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff import export
from vlmdiff.evaluation.map_store import MapStore

FAST_TRAIN = [
    "--accelerator",
    "cpu",
    "--devices",
    "1",
    "--num_workers",
    "0",
    "--batch_size",
    "2",
    "--accumulate_grad_batches",
    "1",
    "--no_progress_bar",
    "--max_steps",
    "2",
    "--lr",
    "1e-3",
    "--save_every_n_steps",
    "2",
]
FAST_TEST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "2",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--batch_size",
    "4",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp, data, start = demo_data_and_model(tmp_path_factory.mktemp("export"), n_train=2, n_test_good=1, n_test_defect=1)
    ckpt_dir = train.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--resume_path",
            str(start),
            "--output_root",
            str(tmp),
            "--exp_name",
            "run",
            *FAST_TRAIN,
        ]
    )
    return tmp, data, ckpt_dir / "last.ckpt"


def test_export_holds_weights_and_config_only(trained):
    tmp, _, ckpt = trained
    out = export.main([str(ckpt), str(tmp / "run.safetensors")])
    full, weights = load_checkpoint(ckpt), load_checkpoint(out)
    assert set(weights["state_dict"]) == set(full["state_dict"])
    for k, v in full["state_dict"].items():
        assert weights["state_dict"][k].dtype == v.dtype and np.array_equal(
            weights["state_dict"][k].numpy(), v.numpy()
        ), k
    assert weights["config"] == full["config"]
    meta = weights["metadata"]
    assert json.loads(meta["format"]) == "vlmdiff-weights"
    assert json.loads(meta["provenance"])["global_step"] == 2
    assert "optimizer_states" not in weights and out.stat().st_size < ckpt.stat().st_size
    assert not list(tmp.glob("*.tmp"))


def test_test_py_gives_the_same_maps_from_the_export(trained):
    tmp, data, ckpt = trained
    out = export.main([str(ckpt), str(tmp / "same.safetensors")])
    results = {}
    for name, weights in (("lightning", ckpt), ("export", out)):
        results[name] = test_script.main(
            [
                "--data_set",
                "mvtec",
                "--data_path",
                str(data),
                "--resume_path",
                str(weights),
                "--output_dir",
                str(tmp / f"res_{name}"),
                *FAST_TEST,
            ]
        )
    assert results["lightning"] == results["export"]
    maps = {n: dict(MapStore(tmp / f"res_{n}" / "maps").iter_classes()) for n in results}
    assert set(maps["lightning"]) == {"brick", "coffee"}
    for cls, arrays in maps["lightning"].items():
        assert np.array_equal(arrays["ids"], maps["export"][cls]["ids"])
        assert np.array_equal(arrays["maps"], maps["export"][cls]["maps"])  # bitwise


def test_bad_export_arguments(trained, tmp_path):
    tmp, _, ckpt = trained
    with pytest.raises(UserError, match=r"\*\.safetensors"):
        export.main([str(ckpt), str(tmp_path / "weights.ckpt")])
    with pytest.raises(UserError, match="missing.ckpt"):
        export.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "w.safetensors")])
    with pytest.raises(UserError, match="not a model checkpoint|does not fit|notes"):
        notes = tmp_path / "notes.ckpt"
        notes.write_text("not weights")
        export.main([str(notes), str(tmp_path / "w.safetensors")])
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))


@contextlib.contextmanager
def _small_disk(folder: Path, monkeypatch):
    """A 1 MiB tmpfs at ``folder`` (root), else writes that fail with ENOSPC when flushed to disk."""
    folder.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )
    if not mounted:
        import utils.io

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(utils.io.os, "fsync", no_space)
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_keeps_the_previous_export(trained, tmp_path, monkeypatch):
    _, _, ckpt = trained
    disk = tmp_path / "disk"
    with _small_disk(disk, monkeypatch):
        target = disk / "w.safetensors"
        target.write_bytes(b"previous export")
        with pytest.raises(UserError, match="w.safetensors.*disk space"):
            export.main([str(ckpt), str(target)])
        assert target.read_bytes() == b"previous export"
        assert sorted(p.name for p in disk.iterdir()) == ["w.safetensors"]
