"""Same seed, same numbers: the tiny pipeline run twice gives identical metrics; every output says what made it.

Pipeline (in-process, tiny preset, a 1-class MVTec-AD-layout dataset): finetune_autoencoder.py (once)
-> build_model.py -> train.py (a few steps) -> test.py, twice with the same seeds into separate folders.
The metric values must be identical (not close); only provenance fields (time, command line) may
differ. Every checkpoint (finetune's last.ckpt and autoencoder.ckpt, build_model's output, train's
checkpoints) and metrics.json must carry the seed, the config, the library versions and the git commit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import build_model
import finetune_autoencoder
import test as test_script
import train
from ldm.checkpoint import load_checkpoint
from tests import datagen
from tests.tinyckpt import write_sd_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SEEDS = {"build": 5, "train": 7, "test": 3, "finetune": 11}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("repro")
    data = datagen.make_mvtec(
        tmp / "mvtec",
        classes=("bottle",),
        n_train=2,
        n_test_good=2,
        defects=("crack", "hole"),
        n_per_defect=1,
        size=32,
        gray_classes=(),
    )
    ae_run = tmp / "ae_run"
    finetune_autoencoder.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--config",
            "tiny",
            "--image_size",
            "32",
            "--batch_size",
            "2",
            "--accumulate_grad_batches",
            "1",
            "--max_steps",
            "1",
            "--num_workers",
            "0",
            "--output_dir",
            str(ae_run),
            "--no_progress_bar",
            "--perceptual_weight",
            "0",
            "--resume_path",
            "none",
            "--log_images_every_n_steps",
            "0",
            "--seed",
            str(SEEDS["finetune"]),
        ]
    )
    return {"tmp": tmp, "data": data, "sd": write_sd_checkpoint(tmp / "sd.ckpt", ema=False), "ae_run": ae_run}


def run_pipeline(inputs: dict[str, Path], name: str) -> dict[str, Path]:
    """build_model -> train (2 optimiser steps) -> test, all outputs under ``{tmp}/{name}``."""
    out = inputs["tmp"] / name
    model = out / "vlmdiff.ckpt"
    build_model.main(
        [
            "--sd_path",
            str(inputs["sd"]),
            "--ae_path",
            str(inputs["ae_run"] / "autoencoder.ckpt"),
            "--output",
            str(model),
            "--config",
            "tiny",
            "--seed",
            str(SEEDS["build"]),
        ]
    )
    ckpt_dir = train.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(inputs["data"]),
            "--resume_path",
            str(model),
            "--output_root",
            str(out),
            "--exp_name",
            "run",
            "--max_steps",
            "2",
            "--save_every_n_steps",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            str(SEEDS["train"]),
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
            "--log_every_n_steps",
            "1",
        ]
    )
    results = out / "results"
    test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(inputs["data"]),
            "--resume_path",
            str(ckpt_dir / "last.ckpt"),
            "--output_dir",
            str(results),
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
            "2",
            "--metrics_protocol",
            "both",
            "--seed",
            str(SEEDS["test"]),
        ]
    )
    return {"model": model, "ckpt_dir": ckpt_dir, "results": results}


@pytest.fixture(scope="module")
def two_runs(inputs: dict[str, Path]) -> tuple[dict[str, Path], dict[str, Path]]:
    return run_pipeline(inputs, "first"), run_pipeline(inputs, "second")


def _without_provenance(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert "provenance" in doc
    return {k: v for k, v in doc.items() if k != "provenance"}


def test_same_seed_gives_identical_metrics(two_runs) -> None:
    first, second = two_runs
    a, b = (
        _without_provenance(first["results"] / "metrics.json"),
        _without_provenance(second["results"] / "metrics.json"),
    )
    values = [v for proto in a["metrics"].values() for v in proto["mean"].values()]
    assert len(values) == 14 and any(v is not None and 0 < v < 1 for v in values), values  # real numbers, not all NaN
    assert a == b  # every metric value identical, per class and mean, both protocols
    assert (first["results"] / "metrics.csv").read_bytes() == (second["results"] / "metrics.csv").read_bytes()
    # the reason they agree: the weights themselves are bit-identical at every stage
    for stage in (lambda r: r["model"], lambda r: r["ckpt_dir"] / "last.ckpt"):
        sd1, sd2 = load_checkpoint(stage(first))["state_dict"], load_checkpoint(stage(second))["state_dict"]
        assert sd1.keys() == sd2.keys()
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    start = load_checkpoint(first["model"])["state_dict"]
    trained = load_checkpoint(first["ckpt_dir"] / "last.ckpt")["state_dict"]
    assert not all(torch.equal(start[k], trained[k]) for k in start)  # training did change the weights


def _check_provenance(info: dict, seed: int, where: str) -> None:
    assert info["seed"] == seed, where
    assert isinstance(info["config"], dict) and info["config"], where
    versions = info["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__, where
    assert versions["python"] and "lightning" in versions and "numpy" in versions, where
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", info["git_commit"] or ""), (where, info["git_commit"])
    else:
        assert info["git_commit"] is None, where
    assert info["time"] and info["command"], where


def test_every_checkpoint_and_metrics_file_carries_provenance(inputs, two_runs) -> None:
    first, _ = two_runs
    finetuned = [inputs["ae_run"] / "autoencoder.ckpt", inputs["ae_run"] / "checkpoints" / "last.ckpt"]
    for path in finetuned:
        ckpt = load_checkpoint(path)
        _check_provenance(ckpt["provenance"], SEEDS["finetune"], str(path))
        assert ckpt["provenance"]["config"]["autoencoder"]["ch"] == 32
    built = load_checkpoint(first["model"])
    _check_provenance(built["provenance"], SEEDS["build"], "build_model output")
    assert built["provenance"]["config"] == built["config"] and built["config"]["unet"]["model_channels"] == 32
    trained = sorted(first["ckpt_dir"].glob("*.ckpt"))
    assert {p.name for p in trained} == {"step=0000002.ckpt", "last.ckpt"}
    for path in trained:
        ckpt = load_checkpoint(path)
        _check_provenance(ckpt["provenance"], SEEDS["train"], str(path))
        assert ckpt["provenance"]["config"] == ckpt["config"]
    metrics = json.loads((first["results"] / "metrics.json").read_text())
    _check_provenance(metrics["provenance"], SEEDS["test"], "metrics.json")
    assert metrics["provenance"]["config"] == built["config"]  # the config of the tested model
    assert metrics["provenance"]["checkpoint"]["path"] == str((first["ckpt_dir"] / "last.ckpt").resolve())
