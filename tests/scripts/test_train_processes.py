"""train.py as a process: SIGKILL then --resume continues the run; two-process DDP on CPU (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from ldm.checkpoint import load_checkpoint
from tests.tinyckpt import demo_data_and_model

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "--data_set",
    "mvtec",
    "--accelerator",
    "cpu",
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("trainproc"), n_train=4, n_test_good=1, n_test_defect=1)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _adam_step(ckpt: dict) -> int:
    state = ckpt["optimizer_states"][0]["state"]
    return int(next(iter(state.values()))["step"])


@pytest.mark.slow
def test_sigkill_then_resume_continues(setup):
    tmp, data, start = setup
    ckpt_dir = tmp / "ckpt_killed"
    args = [
        sys.executable,
        "train.py",
        *COMMON,
        "--devices",
        "1",
        "--data_path",
        str(data),
        "--resume_path",
        str(start),
        "--output_root",
        str(tmp),
        "--exp_name",
        "killed",
        "--max_steps",
        "500",
        "--save_every_n_steps",
        "2",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        # last.ckpt is written after each periodic file, so once step 6's file exists last.ckpt holds step 4 or later
        while not (ckpt_dir / "step=0000006.ckpt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.5)
        time.sleep(1.0)  # kill somewhere after step 6, possibly in the middle of a later save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load_checkpoint(ckpt_dir / "last.ckpt")  # intact despite the kill (atomic saves)
    k = saved["global_step"]
    assert k >= 4 and _adam_step(saved) == k
    train.main(
        [
            *COMMON,
            "--devices",
            "1",
            "--data_path",
            str(data),
            "--resume",
            "--output_root",
            str(tmp),
            "--exp_name",
            "killed",
            "--max_steps",
            str(k + 2),
            "--save_every_n_steps",
            "2",
        ]
    )
    final = load_checkpoint(ckpt_dir / "last.ckpt")
    assert final["global_step"] == k + 2
    assert _adam_step(final) == k + 2  # the optimiser state was restored, not restarted
    assert final["epoch"] >= saved["epoch"]
    assert final["config"] == saved["config"]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(setup):
    tmp, data, start = setup
    args = [
        sys.executable,
        "train.py",
        *COMMON,
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--data_path",
        str(data),
        "--resume_path",
        str(start),
        "--output_root",
        str(tmp),
        "--exp_name",
        "ddp",
        "--max_steps",
        "3",
        "--save_every_n_steps",
        "3",
    ]
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_checkpoint(tmp / "ckpt_ddp" / "last.ckpt")
    assert final["global_step"] == 3
    before = load_checkpoint(start)["state_dict"]
    key = "control_model.middle_block_out.0.weight"
    assert not torch.equal(before[key], final["state_dict"][key])
    # the same run continues on another device count (here one process)
    train.main(
        [
            *COMMON,
            "--devices",
            "1",
            "--data_path",
            str(data),
            "--resume",
            "--output_root",
            str(tmp),
            "--exp_name",
            "ddp",
            "--max_steps",
            "5",
            "--save_every_n_steps",
            "5",
        ]
    )
    resumed = load_checkpoint(tmp / "ckpt_ddp" / "last.ckpt")
    assert resumed["global_step"] == 5 and _adam_step(resumed) == 5
