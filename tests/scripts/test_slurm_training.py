"""Training under a real SLURM scheduler: 2 srun tasks (CPU, gloo) train exactly as 2 torchrun processes.

The job is scripts/slurm_train.sbatch as users submit it, with two tasks on the one node of the local
cluster (tests/slurm_cluster.py) and the tiny settings as its extra arguments; Lightning finds rank, world
size and rendezvous in srun's variables (SLURMEnvironment), torchrun's run in TorchElastic's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import captioner
from ldm.checkpoint import load_checkpoint
from tests.tinyckpt import demo_data_and_model

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "slurm_train.sbatch"
STEPS = 3
TINY = [
    "--accelerator",
    "cpu",
    "--vlm_model",
    "template",
    "--num_workers",
    "0",
    "--batch_size",
    "2",
    "--accumulate_grad_batches",
    "1",
    "--max_steps",
    str(STEPS),
    "--max_epochs",
    "-1",
    "--save_every_n_epochs",
    "1000",
    "--log_interval",
    "0",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp, data, start = demo_data_and_model(
        tmp_path_factory.mktemp("slurm_train"), n_train=4, n_test_good=1, n_test_defect=1
    )
    captioner.main(["--data_set", "mvtec", "--data_path", str(data), "--vlm_model", "template", "--split", "train"])
    return tmp, data, start


@pytest.mark.slow
def test_srun_two_tasks_train_as_torchrun_two_processes(slurm_cluster, setup):
    tmp, data, start = setup
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp / "srun.log"
    job = slurm_cluster.sbatch(
        [
            *("--output", str(log), "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=4G"),
            str(TRAIN_SCRIPT),
            *TINY,
        ],
        cwd=ROOT,
        env={
            **env,
            "DATA_SET": "mvtec",
            "DATA": str(data),
            "START": str(start),
            "CAPTIONS": "mvtec_captions_template_pd",
            "EXP": "srun",
            "OUTPUT_ROOT": str(tmp),
            "PYTHON": sys.executable,
        },
    )
    # the same flags as the script passes with 2 tasks (batch 12 x accumulation 2 x 2 = 48), then the same extras
    torchrun = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"),
            *("--data_set", "mvtec", "--data_path", str(data), "--resume_path", str(start), "--resume"),
            *("--use_captions", "--caption_folder", "mvtec_captions_template_pd", "--exp_name", "torchrun"),
            *("--output_root", str(tmp), "--devices", "2", "--num_nodes", "1", "--precision", "32", "--lr", "1e-5"),
            *("--batch_size", "12", "--accumulate_grad_batches", "2", "--no_progress_bar", *TINY),
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    info = slurm_cluster.wait(job, timeout_s=300)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", slurm_cluster.output_tail(info)
    assert "2 task(s) x batch 12 x accumulation 2" in text  # the script kept the effective batch at 48
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text, text[-3000:]  # two ranks joined

    by_srun = load_checkpoint(tmp / "ckpt_srun" / "last.ckpt")
    by_torchrun = load_checkpoint(tmp / "ckpt_torchrun" / "last.ckpt")
    assert by_srun["global_step"] == by_torchrun["global_step"] == STEPS
    before = load_checkpoint(start)["state_dict"]
    assert any(not torch.equal(v, before[k]) for k, v in by_srun["state_dict"].items() if k in before)
    for key, value in by_torchrun["state_dict"].items():
        torch.testing.assert_close(by_srun["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
