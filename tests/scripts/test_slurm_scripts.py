"""scripts/slurm_train.sbatch and scripts/slurm_test.sbatch under a real SLURM scheduler (tests/slurm_cluster.py).

The scripts users submit run as they are, on CPU with the tiny model: the tiny settings come in as the
scripts' environment variables and extra arguments. The training job is requeued part-way (what a
preemption does), resumes from last.ckpt and ends with the weights of an uninterrupted run; the test job,
submitted with --dependency=afterok on it, starts only after it and writes the metrics of both protocols.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

import captioner
import train
from ldm.checkpoint import load_checkpoint
from tests.slurm_cluster import SlurmCluster, job_time, start_cluster, stop_cluster
from tests.tinyckpt import demo_data_and_model

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "scripts" / "slurm_train.sbatch"
TEST_SCRIPT = ROOT / "scripts" / "slurm_test.sbatch"
# the #SBATCH resources of the scripts are a GPU node's; the local cluster has CPUs only
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G"]
STEPS = 6
TINY_TRAIN = [
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
TINY_TEST = ["--feature_extractor", "efficientnet_lite0", "--ddim_steps", "3", "--device", "cpu", "--num_workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo data with template captions of its training images, and a tiny assembled checkpoint."""
    tmp, data, start = demo_data_and_model(
        tmp_path_factory.mktemp("slurm_scripts"), n_train=4, n_test_good=1, n_test_defect=1
    )
    captioner.main(["--data_set", "mvtec", "--data_path", str(data), "--vlm_model", "template", "--split", "train"])
    return tmp, data, start


def _job_env(tmp: Path, data: Path, **extra: str) -> dict[str, str]:
    return {
        "DATA_SET": "mvtec",
        "DATA": str(data),
        "CAPTIONS": "mvtec_captions_template_pd",
        "PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _wait_for_step(log: Path, step: int, cluster: SlurmCluster, job: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not (log.is_file() and re.search(rf": step ({step}|[1-9]\d+)/", log.read_text(errors="replace"))):
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), f"{info['JobState']}\n{cluster.output_tail(info)}"
        assert time.monotonic() < deadline, (
            f"no training step {step} within {timeout_s:g} s\n{cluster.output_tail(info)}"
        )
        time.sleep(0.2)


@pytest.mark.slow
def test_requeued_training_resumes_to_the_uninterrupted_weights_then_the_test_job_runs(slurm_cluster, setup):
    tmp, data, start = setup
    log = tmp / "train.log"
    env = _job_env(tmp, data, START=str(start), OUTPUT_ROOT=str(tmp), EXP="requeued")
    job = slurm_cluster.sbatch(["--output", str(log), *CPU_JOB, str(TRAIN_SCRIPT), *TINY_TRAIN], cwd=ROOT, env=env)
    results = tmp / "results"
    test_log = tmp / "test.log"
    test_env = _job_env(tmp, data, CKPT=str(tmp / "ckpt_requeued" / "last.ckpt"), OUT=str(results))
    dependent = slurm_cluster.sbatch(
        ["--output", str(test_log), *CPU_JOB, f"--dependency=afterok:{job}", str(TEST_SCRIPT), *TINY_TEST],
        cwd=ROOT,
        env=test_env,
    )

    _wait_for_step(log, 2, slurm_cluster, job)
    slurm_cluster.requeue(job)  # SIGTERM to the running job, then it starts again

    # meanwhile the same training, uninterrupted, in this process (the flags the script passes, then the same extras)
    train.main(
        [
            *("--data_set", "mvtec", "--data_path", str(data), "--resume_path", str(start), "--resume"),
            *("--use_captions", "--caption_folder", "mvtec_captions_template_pd", "--exp_name", "straight"),
            *("--output_root", str(tmp), "--devices", "1", "--num_nodes", "1", "--precision", "32", "--lr", "1e-5"),
            "--no_progress_bar",
            *TINY_TRAIN,
        ]
    )

    info = slurm_cluster.wait(job, timeout_s=300)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", slurm_cluster.output_tail(info)
    assert info["Restarts"] == "1", text[-3000:]
    saved = re.findall(r"SIGTERM: saved \S+ at step (\d+)", text)
    assert len(saved) == 1 and 0 < int(saved[0]) < STEPS, text[-3000:]  # stopped part-way ...
    assert re.search(r"resuming \S+last\.ckpt", text), text[-3000:]  # ... and continued from last.ckpt
    assert "(restart 1)" in text and "Traceback" not in text

    requeued = load_checkpoint(tmp / "ckpt_requeued" / "last.ckpt")
    straight = load_checkpoint(tmp / "ckpt_straight" / "last.ckpt")
    assert requeued["global_step"] == straight["global_step"] == STEPS
    before = load_checkpoint(start)["state_dict"]
    moved = [k for k, v in straight["state_dict"].items() if k in before and not torch.equal(v, before[k])]
    assert moved, "training changed no weight"
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(requeued["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)

    dep = slurm_cluster.wait(dependent, timeout_s=300)
    assert dep["JobState"] == "COMPLETED", slurm_cluster.output_tail(dep)
    assert job_time(dep["StartTime"]) >= job_time(info["EndTime"])
    assert (results / "metrics.json").is_file() and (results / "report.html").is_file()
    assert "legacy" in (results / "metrics.json").read_text()


def test_a_second_local_cluster_runs_beside_the_first_and_stops_by_its_pid_files(slurm_cluster, tmp_path):
    second = start_cluster(tmp_path / "second")
    try:
        pids = [int(p.read_text()) for p in sorted(second.folder.glob("*.pid"))]
        assert len(pids) == 2  # slurmctld and one slurmd
        jobs = [
            (cluster, cluster.sbatch(["--output", str(tmp_path / f"{i}.out"), "--wrap", f"echo {i}"], cwd=tmp_path))
            for i, cluster in enumerate((slurm_cluster, second))
        ]
        assert jobs[0][1] != jobs[1][1]  # each cluster numbers its jobs from its own random start
        for cluster, job in jobs:
            assert cluster.wait(job)["JobState"] == "COMPLETED"
        assert [(tmp_path / f"{i}.out").read_text() for i in range(2)] == ["0\n", "1\n"]
    finally:
        stop_cluster(second)
    assert not list(second.folder.glob("*.pid"))
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert slurm_cluster.state(jobs[0][1]) == "COMPLETED"  # the first cluster still answers
