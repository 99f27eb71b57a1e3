"""vlmdiff.pipeline pieces: completion checks, job scripts, the status line, FLOP counts and the paper table."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from utils.errors import UserError
from vlmdiff.evaluation.metrics import METRICS, PAPER_RESULTS
from vlmdiff.evaluation.paper_table import write_paper_table
from vlmdiff.pipeline import checks, launchers
from vlmdiff.pipeline.plan import build_plan
from vlmdiff.pipeline.recipe import load_recipe


# ------------------------------------------------------------------------------------------- checks
def test_checkpoint_check_reads_the_header_and_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "x.ckpt"
    assert "missing" in checks.checkpoint_done(path)
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    assert checks.checkpoint_done(path) is None
    path.write_bytes(path.read_bytes()[:40])
    assert "unreadable or truncated" in checks.checkpoint_done(path)
    from safetensors.torch import save_file

    st = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(3)}, str(st))
    assert checks.checkpoint_done(st) is None


def test_test_check_wants_both_protocols_from_the_current_checkpoint(tmp_path):
    from ldm.checkpoint import save_checkpoint, stored_digest
    from vlmdiff.evaluation.run_inputs import checkpoint_record

    ckpt, res = tmp_path / "m.ckpt", tmp_path / "res"
    save_checkpoint(ckpt, {"w": torch.ones(3)})
    res.mkdir()
    (res / "manifest.json").write_text(json.dumps({"checkpoint": checkpoint_record(ckpt, stored_digest(ckpt))}))
    (res / "metrics.json").write_text(json.dumps({"metrics": {"official": {}}}))
    assert "lacks the legacy and official" in checks.test_done(res, ckpt)
    (res / "metrics.json").write_text(json.dumps({"metrics": {"official": {}, "legacy": {}}}))
    assert checks.test_done(res, ckpt) is None
    save_checkpoint(ckpt, {"w": torch.ones(3) * 2})  # retrained, same size: the results are stale
    assert "other weights" in checks.test_done(res, ckpt)


# ------------------------------------------------------------------------------------------- job scripts
def test_job_scripts_are_valid_bash_with_the_resources_and_status_files(tmp_path):
    recipe = load_recipe("mvtec", ["train.resources.gpus=2"])
    jobs = {j.stage: j for j in build_plan(recipe, tmp_path, "slurm")}
    train = launchers.job_script(jobs["train"], tmp_path, "mvtec")
    assert "#SBATCH --gres=gpu:2" in train and "#SBATCH --requeue" in train and "#SBATCH --time=2-00:00:00" in train
    assert "--accumulate_grad_batches 2" in train and "--kill-on-invalid-dep=yes" in train
    assert "export OMP_NUM_THREADS=8" in train
    assert "#SBATCH --ntasks-per-node=2" in train and "srun /" in train  # one task per GPU, ranks from SLURM
    test = launchers.job_script(jobs["test"], tmp_path, "mvtec")
    assert "#SBATCH --array=0-3" in test and "3) START=1296; END=-1 ;;" in test
    assert "--start_ind $START --end_ind $END" in test and "_${SLURM_ARRAY_TASK_ID}" in test
    ae = launchers.job_script(jobs["autoencoder"], tmp_path, "mvtec")
    assert f"RESUME=(); [ -f {tmp_path}/autoencoder/checkpoints/last.ckpt ] && RESUME=(--resume)" in ae
    merge = launchers.job_script(jobs["merge"], tmp_path, "mvtec")
    assert "--run_eval_only" in merge and "vlmdiff.evaluation.paper_table" in merge
    assert "#SBATCH --ntasks-per-node=1" in merge and "srun" not in merge
    for text in (train, test, ae, merge):
        script = tmp_path / "x.sbatch"
        script.write_text(text)
        subprocess.run(["bash", "-n", str(script)], check=True)


# ------------------------------------------------------------------------------------------- status
def test_status_names_the_failed_array_task_with_its_job_id_and_log(tmp_path):
    run = tmp_path
    (run / "status").mkdir()
    entries = [
        {
            "key": "05_train",
            "stage": "train",
            "part": None,
            "job_id": "11",
            "array": 0,
            "log": f"{run}/logs/05_train_11.log",
        },
        {
            "key": "06_test",
            "stage": "test",
            "part": None,
            "job_id": "12",
            "array": 2,
            "log": f"{run}/logs/06_test_12_%a.log",
        },
    ]
    (run / "jobs.json").write_text(json.dumps({"jobs": entries}))
    (run / "status" / "05_train.ok").write_text("0\n")
    (run / "status" / "06_test_0.ok").write_text("0\n")
    (run / "status" / "06_test_1.failed").write_text("137\n")
    line = launchers.status_line(run)
    assert line == f"FAILED: stage test, job 12, exit code 137, log {run}/logs/06_test_12_1.log"
    (run / "status" / "06_test_1.failed").unlink()
    (run / "status" / "06_test_1.ok").write_text("0\n")
    assert launchers.status_line(run).endswith("all 2 jobs finished; paper table: " + str(run / "paper_table.md"))


# ------------------------------------------------------------------------------------------- FLOPs
def test_flop_counts_on_the_meta_device_add_up():
    from vlmdiff.pipeline.compute import cached_flops, count_flops

    f = count_flops("tiny", features="resnet50", ddim_steps=10)
    assert f["train_image"] > 0 and f["unet_sg_step"] > 0
    assert f["test_image_two_passes"] - f["test_image_one_pass"] == pytest.approx(10 * f["unet_sg_step"])
    sd15 = cached_flops()["flops"]
    assert set(sd15) == set(f)
    # SD-1.5 size: a UNet + SG pass at 32x32 latents is a few hundred GFLOPs; ten of them dominate a test image
    assert 1e11 < sd15["unet_sg_step"] < 1e12 and sd15["test_image_one_pass"] > 10 * sd15["unet_sg_step"]


# ------------------------------------------------------------------------------------------- paper table
def _fake_run(folder: Path, cls: str, legacy: float, official: float, epoch: int = 99) -> Path:
    row = lambda v: {k: v for k in METRICS}  # noqa: E731
    folder.mkdir(parents=True)
    metrics = {p: {"per_class": {cls: row(v)}, "mean": row(v)} for p, v in (("legacy", legacy), ("official", official))}
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    ckpt = {"path": f"/runs/ckpt_{folder.name}/model_epoch={epoch:03d}.ckpt", "size": 7, "weights_sha256": "ab12"}
    (folder / "manifest.json").write_text(json.dumps({"checkpoint": ckpt}))
    return folder


def test_coco_paper_table_is_the_mean_of_the_four_parts_with_each_parts_source(tmp_path):
    runs = [_fake_run(tmp_path / f"coco_part{p}", "coco", 0.5 + 0.1 * p, 0.4 + 0.1 * p) for p in range(4)]
    md = write_paper_table("coco", runs, tmp_path / "out").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 65.0 | 65.0 |" in rows["ours, legacy protocol (the paper's)"]  # mean of 50, 60, 70, 80
    assert "| 55.0 | 55.0 |" in rows["ours, official protocol (exact)"]
    assert "mean of the parts, [1] [2] [3] [4]" in rows["ours, legacy protocol (the paper's)"]
    paper = PAPER_RESULTS["coco"]
    assert f"| {100 * paper['auroc_image']:.1f} |" in rows["paper (legacy protocol)"]
    assert "| part 3 (coco) | official | 70.0 |" in md
    assert "[3] test run " + str(runs[2]) + ", checkpoint /runs/ckpt_coco_part2/model_epoch=099.ckpt (epoch 100" in md
    with open(tmp_path / "out" / "paper_table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    mean_legacy = next(r for r in table if r["row"] == "ours, legacy protocol (the paper's)")
    assert float(mean_legacy["aupro"]) == pytest.approx(0.65)
    assert mean_legacy["checkpoints"].count("model_epoch=099.ckpt") == 4
    assert "<table" in (tmp_path / "out" / "paper_table.html").read_text()


def test_paper_table_needs_both_protocols(tmp_path):
    run = _fake_run(tmp_path / "r", "bottle", 0.5, 0.5)
    data = json.loads((run / "metrics.json").read_text())
    del data["metrics"]["legacy"]
    (run / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="--metrics_protocol both"):
        write_paper_table("mvtec", [run], tmp_path / "out")
    assert not (tmp_path / "out" / "paper_table.md").exists()
