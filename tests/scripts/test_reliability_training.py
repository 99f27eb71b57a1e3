"""Training reliability: SIGTERM saves a resumable checkpoint and exits 143; a non-finite loss stops the run.

Both for train.py and finetune_autoencoder.py. The SIGTERM tests start a real process, wait for the
first logged step, send SIGTERM and resume in-process from what it saved.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune_autoencoder
import train
from ldm.checkpoint import load_checkpoint
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff.training import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [
    "--data_set",
    "mvtec",
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
    "--log_interval",
    "0",
]
AE = [
    "--data_set",
    "mvtec",
    "--config",
    "tiny",
    "--image_size",
    "32",
    "--batch_size",
    "2",
    "--accumulate_grad_batches",
    "1",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--perceptual_weight",
    "0",
    "--log_images_every_n_steps",
    "0",
    "--log_every_n_steps",
    "1",
    "--resume_path",
    "none",
    "--log_interval",
    "0",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("reliability"), n_train=4, n_test_good=1, n_test_defect=1)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _sigterm_after_first_step(args: list[str], log_file: Path) -> int:
    """Run ``python *args``, SIGTERM it once it has logged a training step; return its exit code."""
    with open(log_file, "wb") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        try:
            while b": step 1/" not in log_file.read_bytes():  # the plain progress line of the first step
                assert proc.poll() is None, log_file.read_text()[-3000:]
                assert time.time() < deadline, "no training step within 5 minutes"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _adam_step(ckpt: dict) -> int:
    return int(max(s["step"].item() for s in ckpt["optimizer_states"][0]["state"].values()))


@pytest.mark.slow
def test_train_sigterm_saves_last_checkpoint_and_resume_continues(setup):
    tmp, data, start = setup
    ckpt_dir = tmp / "ckpt_term"
    args = [
        "train.py",
        *TRAIN,
        "--data_path",
        str(data),
        "--resume_path",
        str(start),
        "--output_root",
        str(tmp),
        "--exp_name",
        "term",
        "--max_steps",
        "100000",
        "--max_epochs",
        "-1",
        "--save_every_n_epochs",
        "1000",
    ]
    code = _sigterm_after_first_step(args, tmp / "term.log")
    log_text = (tmp / "term.log").read_text()
    assert code == EXIT_PREEMPTED, log_text[-3000:]
    assert "SIGTERM: saved" in log_text and "Traceback" not in log_text, log_text[-3000:]
    saved = load_checkpoint(ckpt_dir / "last.ckpt")
    k = saved["global_step"]
    assert k >= 1 and _adam_step(saved) == k
    assert not list(ckpt_dir.glob("*.tmp"))
    train.main(
        [
            *TRAIN,
            "--data_path",
            str(data),
            "--resume",
            "--output_root",
            str(tmp),
            "--exp_name",
            "term",
            "--max_steps",
            str(k + 2),
            "--save_every_n_epochs",
            "1000",
        ]
    )
    final = load_checkpoint(ckpt_dir / "last.ckpt")
    assert final["global_step"] == k + 2 and _adam_step(final) == k + 2


@pytest.mark.slow
def test_autoencoder_sigterm_saves_last_checkpoint_and_resume_continues(tmp_path):
    from vlmdiff.data.demo import generate_demo_dataset

    data = generate_demo_dataset(
        tmp_path / "data", classes=["china"], n_train=4, n_test_good=0, n_test_defect=0, image_size=32, seed=0
    )
    run = tmp_path / "run"
    args = [
        "finetune_autoencoder.py",
        *AE,
        "--data_path",
        str(data),
        "--output_dir",
        str(run),
        "--max_steps",
        "100000",
        "--save_every_n_steps",
        "0",
    ]
    code = _sigterm_after_first_step(args, tmp_path / "ae.log")
    log_text = (tmp_path / "ae.log").read_text()
    assert code == EXIT_PREEMPTED, log_text[-3000:]
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    k = last["autoencoder_steps"]
    assert k >= 1 and _adam_step(last) == k
    finetune_autoencoder.main(
        [*AE, "--data_path", str(data), "--output_dir", str(run), "--resume", "--max_steps", str(k + 2)]
    )
    assert load_checkpoint(run / "autoencoder.ckpt")["global_step"] == k + 2


def _all_finite(path: Path) -> bool:
    sd = load_checkpoint(path)["state_dict"]
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def _diverged_at(message: str) -> int:
    return int(re.search(r"at step ([0-9]+)", message).group(1))


def test_train_nan_loss_stops_naming_the_step_and_saves_no_nan(setup):
    tmp, data, start = setup
    ckpt_dir = tmp / "ckpt_nan"
    with pytest.raises(UserError, match=r"training diverged: the loss is (nan|inf) at step [0-9]+") as e:
        train.main(
            [
                *TRAIN,
                "--data_path",
                str(data),
                "--output_root",
                str(tmp),
                "--exp_name",
                "nan",
                "--resume_path",
                str(start),
                "--max_steps",
                "20",
                "--save_every_n_steps",
                "1",
                "--lr",
                "1e6",
            ]
        )
    step = _diverged_at(str(e.value))
    saved = sorted(ckpt_dir.glob("*.ckpt"))
    assert saved and all(_all_finite(p) for p in saved)  # the periodic saves before the divergence only
    assert load_checkpoint(ckpt_dir / "last.ckpt")["global_step"] < step
    assert not list(ckpt_dir.glob(f"step={step:07d}.ckpt")) and not list(ckpt_dir.glob("*.tmp"))


def test_autoencoder_nan_loss_stops_naming_the_step_and_saves_no_nan(tmp_path):
    from vlmdiff.data.demo import generate_demo_dataset

    data = generate_demo_dataset(
        tmp_path / "data", classes=["china"], n_train=4, n_test_good=0, n_test_defect=0, image_size=32, seed=0
    )
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"training diverged: the loss is (nan|inf) at step [0-9]+"):
        finetune_autoencoder.main(
            [
                *AE,
                "--data_path",
                str(data),
                "--output_dir",
                str(run),
                "--save_every_n_steps",
                "1",
                "--max_steps",
                "20",
                "--base_lr",
                "1e6",
            ]
        )
    last = run / "checkpoints" / "last.ckpt"
    assert _all_finite(last) and load_checkpoint(last)["autoencoder_steps"] >= 1
    assert not (run / "autoencoder.ckpt").exists()


def test_a_checkpoint_with_nan_weights_is_not_written(setup, tmp_path):
    """The save guard on its own: a trainer asked to save NaN weights raises and leaves the old file."""
    import lightning.pytorch as pl

    from ldm.checkpoint_io import AtomicCheckpointIO
    from vlmdiff.checkpoint import load_vlmdiff
    from vlmdiff.training import FiniteTraining

    _, _, start = setup
    model, _ = load_vlmdiff(start)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[FiniteTraining()],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=False,
        max_steps=0,
    )
    trainer.strategy.connect(model)
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")
    with torch.no_grad():
        model.control_model.input_hint_block[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(
        UserError, match=r"NaN or infinite values \(e\.g\. control_model\.input_hint_block\.0\.weight\)"
    ):
        trainer.save_checkpoint(target)
    assert target.read_bytes() == b"previous" and not list(tmp_path.glob("*.tmp"))
