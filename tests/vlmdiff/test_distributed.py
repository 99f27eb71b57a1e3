"""Test inference and captioning over two processes (torchrun, gloo on CPU) equal one process; rank detection
from Lightning's cluster environments; a SLURM job started without srun runs as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import test as test_script
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff import distributed
from vlmdiff.data.captions import read_jsonl
from vlmdiff.evaluation.map_store import MapStore

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# what an sbatch script with --ntasks-per-node=2 sees when it runs `python ...` itself (no srun: no SLURM_STEP_ID)
SLURM_BATCH = {
    "SLURM_JOB_ID": "4321",
    "SLURM_JOB_NAME": "vlmdiff",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "node7",
}
TEST_ARGS = [
    "--data_set",
    "mvtec",
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
    "2",
]


def _torchrun(script: str, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        script,
        *args,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("dist"), n_train=2, n_test_good=2, n_test_defect=3, seed=1)


@pytest.mark.slow
def test_two_rank_test_inference_equals_one_process(setup):
    tmp, data, ckpt = setup
    # the ranks run one thread each; oneDNN reduces some convolutions differently with another thread
    # count (~1e-6 in the maps), so the one-process reference uses one thread as well
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = test_script.main(
            [*TEST_ARGS, "--data_path", str(data), "--resume_path", str(ckpt), "--output_dir", str(tmp / "one")]
        )["official"]
    finally:
        torch.set_num_threads(threads)
    _torchrun(
        "test.py", [*TEST_ARGS, "--data_path", str(data), "--resume_path", str(ckpt), "--output_dir", str(tmp / "two")]
    )
    two = json.loads((tmp / "two" / "metrics.json").read_text())["metrics"]["official"]
    for cls in single["per_class"]:
        for k, v in single["per_class"][cls].items():
            assert two["per_class"][cls][k] == pytest.approx(v, abs=1e-6, nan_ok=True), (cls, k)
    ids_one, ids_two = MapStore(tmp / "one" / "maps").scored_ids(), MapStore(tmp / "two" / "maps").scored_ids()
    assert ids_one == ids_two and len(ids_two) == 10
    chunks = list((tmp / "two" / "maps").rglob("*.npz"))
    assert len({p.name for p in chunks}) > 1  # both ranks wrote chunks
    a = dict(MapStore(tmp / "one" / "maps").iter_classes())
    b = dict(MapStore(tmp / "two" / "maps").iter_classes())
    assert all(np.array_equal(a[c]["maps"], b[c]["maps"]) for c in a)


@pytest.mark.slow
def test_two_rank_captioning_captions_every_image_once(setup):
    tmp, data, _ = setup
    out = tmp / "captions"
    _torchrun(
        "captioner.py",
        ["--data_set", "mvtec", "--data_path", str(data), "--vlm_model", "template", "--output", str(out)],
    )
    records = [r for p in sorted((out / "progress").glob("*.jsonl")) for r in read_jsonl(p)]
    assert len(list((out / "progress").glob("*rank*of2.jsonl"))) == 2
    keys = [(r["split"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == 4 + 10  # 2 train per class, 5 test per class
    labels = json.loads((out / "test_labels_mvtec_template.json").read_text())
    caps = json.loads((out / "test_captions_mvtec_template.json").read_text())
    assert len(labels) == len(caps) == 10 and len(set(labels)) == 10


@pytest.fixture
def no_launcher(monkeypatch):
    """An environment without torchrun's or SLURM's variables; the test adds the ones it needs.

    Lightning's cluster environments write MASTER_ADDR/MASTER_PORT themselves (SLURMEnvironment does
    when asked for the main address): whatever the test left is removed afterwards, so no later
    process inherits a rendezvous address (a DDP run would wait for a host that does not exist).
    """
    before = {name: os.environ.get(name) for name in LAUNCHER_VARS}
    for name in [*LAUNCHER_VARS, *[k for k in os.environ if k.startswith("SLURM_")]]:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_rank_detection_follows_the_launcher(no_launcher, caplog):
    assert distributed.detect_ranks() == distributed.Ranks(0, 1, 0)
    for k, v in SLURM_BATCH.items():
        no_launcher.setenv(k, v)
    with caplog.at_level("WARNING", logger="vlmdiff.distributed"):
        assert distributed.detect_ranks() == distributed.Ranks(0, 1, 0)  # batch script without srun
    assert "not started by srun" in caplog.text
    no_launcher.setenv("SLURM_STEP_ID", "0")  # a task started by srun
    no_launcher.setenv("SLURM_PROCID", "1")
    no_launcher.setenv("SLURM_LOCALID", "1")
    ranks = distributed.detect_ranks()
    assert ranks == distributed.Ranks(1, 2, 1)
    assert ranks.environment.main_address == "node7"
    no_launcher.setenv("SLURM_JOB_NAME", "interactive")  # Lightning's rule: an interactive allocation is no job
    assert distributed.detect_ranks() == distributed.Ranks(0, 1, 0)
    no_launcher.setenv("SLURM_JOB_NAME", "vlmdiff")
    no_launcher.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(UserError, match="ntasks-per-node"):
        distributed.detect_ranks()
    # torchrun inside a SLURM job: torchrun's ranks win
    for k, v in {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "TORCHELASTIC_RUN_ID": "x",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        no_launcher.setenv(k, v)
    assert distributed.detect_ranks() == distributed.Ranks(3, 4, 1)


def test_joining_a_group_whose_other_rank_never_comes_times_out(no_launcher):
    import socket
    import time

    with socket.socket() as s:  # a free port: nobody hosts the rendezvous there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", str(port))
    start = time.monotonic()
    with pytest.raises(UserError, match="could not join .* within 2 s"):
        distributed.init(distributed.Ranks(1, 2, 0), torch.device("cpu"), timeout_s=2)
    assert time.monotonic() - start < 30
    assert not torch.distributed.is_initialized()


def _run_as_slurm_batch(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    env.update(SLURM_BATCH, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_slurm_job_without_srun_runs_as_one_process(setup):
    tmp, data, ckpt = setup
    done = _run_as_slurm_batch(
        "test.py",
        [
            *TEST_ARGS,
            "--data_path",
            str(data),
            "--resume_path",
            str(ckpt),
            "--classes",
            "brick",
            "--output_dir",
            str(tmp / "slurm_batch"),
        ],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not started by srun: running as one process" in done.stderr
    assert len(MapStore(tmp / "slurm_batch" / "maps").scored_ids()) == 5  # every brick test image, one process
    out = tmp / "slurm_captions"
    done = _run_as_slurm_batch(
        "captioner.py",
        ["--data_set", "mvtec", "--data_path", str(data), "--vlm_model", "template", "--output", str(out)],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not started by srun" in done.stderr
    assert [p.name for p in (out / "progress").glob("*.jsonl")] == ["mvtec_template_pd_0-end.jsonl"]
    assert len(json.loads((out / "test_labels_mvtec_template.json").read_text())) == 10
