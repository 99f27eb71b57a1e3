"""Test inference and captioning over two processes (torchrun, gloo on CPU) equal one process."""

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
from vlmdiff.data.captions import read_jsonl
from vlmdiff.map_store import MapStore

ROOT = Path(__file__).resolve().parents[2]
TEST_ARGS = ["--data_set", "mvtec", "--feature_extractor", "efficientnet_lite0", "--ddim_steps", "3",
             "--num_workers", "0", "--no_progress_bar", "--device", "cpu", "--batch_size", "2"]


def _torchrun(script: str, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           script, *args]
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
        single = test_script.main([*TEST_ARGS, "--data_path", str(data), "--resume_path", str(ckpt),
                                   "--output_dir", str(tmp / "one")])["official"]
    finally:
        torch.set_num_threads(threads)
    _torchrun("test.py", [*TEST_ARGS, "--data_path", str(data), "--resume_path", str(ckpt),
                          "--output_dir", str(tmp / "two")])
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
    _torchrun("captioner.py", ["--data_set", "mvtec", "--data_path", str(data), "--vlm_model", "template",
                               "--output", str(out)])
    records = [r for p in sorted((out / "progress").glob("*.jsonl")) for r in read_jsonl(p)]
    assert len(list((out / "progress").glob("*rank*of2.jsonl"))) == 2
    keys = [(r["split"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == 4 + 10  # 2 train per class, 5 test per class
    labels = json.loads((out / "test_labels_mvtec_template.json").read_text())
    caps = json.loads((out / "test_captions_mvtec_template.json").read_text())
    assert len(labels) == len(caps) == 10 and len(set(labels)) == 10
