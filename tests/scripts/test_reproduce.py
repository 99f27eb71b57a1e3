"""scripts/reproduce.py: recipes, the dry-run plan, overrides, bad recipes, and the tiny recipe run end to end here.

The plan tests are in-process and read no data. The end-to-end test runs the tiny recipe (demo data,
tiny models, every stage through the real scripts' main) and then reruns it to see that nothing reruns.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


reproduce = _load_script()


def dry_run(capsys, *args: str) -> str:
    assert reproduce.main(["--dry_run", *args]) == 0
    return capsys.readouterr().out


def commands(plan: str, script: str) -> list[str]:
    return [line.strip()[2:] for line in plan.splitlines() if line.strip().startswith(f"$ python {script}")]


def jobs_of(plan: str) -> list[tuple[str, str]]:
    """(key, stage) of every job the plan prints."""
    return re.findall(r"^\[(\d\d_\w+)\] (\w+) ", plan, re.M)


@pytest.mark.parametrize(
    ("recipe", "epochs", "every", "test_images"),
    [("mvtec", 300, 25, 1725), ("visa", 300, 25, 2162), ("realiad", 100, 20, 114000)],
)
def test_dry_run_prints_the_papers_settings_and_writes_nothing(capsys, tmp_path, recipe, epochs, every, test_images):
    run = tmp_path / "run"
    plan = dry_run(capsys, "--recipe", recipe, "--launcher", "slurm", "--run_dir", str(run))
    assert not run.exists()
    stages = [s for _, s in jobs_of(plan)]
    sharded_captions = recipe == "realiad"  # 150k images: a job array, then a merge job
    assert stages == ["captions"] + ["captions_merge"] * sharded_captions + [
        "autoencoder",
        "build",
        "train",
        "test",
        "merge",
    ]
    cap = commands(plan, "captioner.py")
    assert all("--vlm_model internvl --prompt_type pd --split both" in c for c in cap)
    if sharded_captions:
        assert cap[0].endswith("--start_ind {start} --end_ind {end}") and cap[1].endswith("--merge")
    (ae,) = commands(plan, "finetune_autoencoder.py")
    assert f"--data_set {recipe}" in ae and "--resume_path models/autoencoders.ckpt" in ae
    assert "--max_steps 60001 --batch_size 1 --accumulate_grad_batches 8 --base_lr 4.5e-05" in ae
    (build,) = commands(plan, "build_model.py")
    assert f"--ae_path {run}/autoencoder/autoencoder.ckpt" in build and "--sd_path models/v1-5-pruned.ckpt" in build
    (train,) = commands(plan, "train.py")
    assert "--use_captions --vlm_model internvl --prompt_type pd" in train
    assert f"--max_epochs {epochs} --save_every_n_epochs {every}" in train
    assert "--batch_size 12 --accumulate_grad_batches 4 --lr 1e-05 --precision 32" in train
    shard, merge = commands(plan, "test.py")
    final = f"model_epoch={epochs - 1:03d}.ckpt"
    for test in (shard, merge):
        assert final in test and "--use_captions" not in test  # the empty caption at test time, as the paper
        assert "--feature_extractor dino_v1s8 --ddim_steps 10 --noise_t 999" in test
        assert "--metrics_protocol both" in test and "--precision 32" in test
    assert "--start_ind {start} --end_ind {end}" in shard and merge.endswith("--run_eval_only")
    # the shards cover the test set: the last one runs to the end
    bounds = re.findall(r"shards \(start, end\): (.*)", plan)[-1].split(", ")
    assert bounds[0].startswith("0:") and bounds[-1].endswith(":-1")
    assert int(bounds[-1].split(":")[0]) < test_images <= int(bounds[-1].split(":")[0]) + math.ceil(test_images / 4)
    assert "python -m vlmdiff.evaluation.paper_table --dataset" in plan
    assert "sbatch --gres=gpu:1" in plan and "--requeue" in plan
    captions = "02_captions_merge" if sharded_captions else "01_captions"  # train waits for its model and the captions
    assert re.search(rf"\[\d\d_train\] train \(to run\); after: \d\d_build, {captions}$", plan, re.M)
    assert "Estimated GPU-hours" in plan and "ESTIMATE" in plan
    for stage in ("captions", "autoencoder", "train", "test"):
        assert re.search(rf"^{stage}\s+[\d,]+\s+[\d.]+\s+\w+\s+[\d.]+\s+[\d.]+$", plan, re.M), stage


def test_coco_plan_has_one_autoencoder_model_training_and_test_per_part(capsys, tmp_path):
    run = tmp_path / "run"
    plan = dry_run(capsys, "--recipe", "coco", "--launcher", "slurm", "--run_dir", str(run))
    stages = [s for _, s in jobs_of(plan)]
    per_part = {s: stages.count(s) for s in ("autoencoder", "build", "train", "test", "merge")}
    assert per_part == {"autoencoder": 4, "build": 4, "train": 4, "test": 4, "merge": 4}
    # the count: 4 autoencoders, 4 builds, 4 trainings, 4 tests (each an array and its merge)
    assert sum(per_part[s] for s in ("autoencoder", "build", "train", "test")) == 16
    assert stages.count("captions") == 1 and stages.count("captions_merge") == 1 and stages[-1] == "report"
    for p in range(4):
        (ae,) = [c for c in commands(plan, "finetune_autoencoder.py") if f"--coco_part {p} " in c]
        assert f"--output_dir {run}/autoencoder_part{p} " in ae
        (build,) = [c for c in commands(plan, "build_model.py") if f"autoencoder_part{p}/" in c]
        assert f"--output {run}/models/vlmdiff_part{p}.ckpt" in build
        (train,) = [c for c in commands(plan, "train.py") if f"--coco_part {p} " in c]
        assert f"--resume_path {run}/models/vlmdiff_part{p}.ckpt" in train and "--max_epochs 100" in train
        assert "--use_captions --vlm_model internvl --prompt_type pd --caption_model _internvl" in train
        tests = [c for c in commands(plan, "test.py") if f"--coco_part {p} " in c]
        assert len(tests) == 2 and all("--use_captions" in t for t in tests)  # COCO-AD tests with its captions
    (report,) = [line for line in plan.splitlines() if "paper_table" in line and "$ python" in line]
    assert all(f"results/coco_part{p}" in report for p in range(4))
    assert re.search(r"^\[\d\d_report\] report .*after: (\d\d_merge_part\d, ){3}\d\d_merge_part\d$", plan, re.M)


def test_local_plan_runs_the_test_in_one_job(capsys, tmp_path):
    plan = dry_run(capsys, "--recipe", "mvtec", "--run_dir", str(tmp_path / "run"))
    assert [s for _, s in jobs_of(plan)] == ["captions", "autoencoder", "build", "train", "test", "report"]
    (test,) = commands(plan, "test.py")
    assert "--start_ind" not in test and "--run_eval_only" not in test


@pytest.mark.parametrize(("gpus", "accumulation"), [(1, 4), (2, 2), (4, 1)])
def test_more_gpus_keep_the_effective_batch_at_48(capsys, tmp_path, gpus, accumulation):
    plan = dry_run(capsys, "--recipe", "mvtec", "--run_dir", str(tmp_path), f"train.resources.gpus={gpus}")
    (train,) = commands(plan, "train.py")
    assert f"--batch_size 12 --accumulate_grad_batches {accumulation} --lr 1e-05" in train
    assert f"--devices {gpus} --accelerator gpu" in train


def test_overrides_reach_the_command_lines(capsys, tmp_path):
    plan = dry_run(capsys, "--recipe", "mvtec", "--run_dir", str(tmp_path), "train.epochs=10", "test.shards=2")
    (train,) = commands(plan, "train.py")
    assert "--max_epochs 10 " in train
    assert "model_epoch=009.ckpt" in commands(plan, "test.py")[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.epoch=10"], "config override 'train.epoch=10': unknown key 'train.epoch'"),
        (["train.epochs=ten"], "config override 'train.epochs=ten': key 'train.epochs'"),
        (["train.resources.gpus=5"], "'train.effective_batch' 48, 'train.batch_size' 12 and 'train.resources.gpus' 5"),
        (["data.data_set=imagenet"], "key 'data.data_set': 'imagenet' is not one of"),
    ],
)
def test_bad_overrides_fail_in_one_line_naming_the_key(tmp_path, args, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        reproduce.main(["--recipe", "mvtec", "--dry_run", "--run_dir", str(tmp_path), *args])
    assert "\n" not in str(e.value)


def test_a_bad_recipe_file_fails_naming_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndata:\n  data_set: mvtec\n  train_images: [1]\n  test_images: [1]\ntrain:\n  lr: fast\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}: key 'train.lr'"):
        reproduce.main(["--recipe", str(bad), "--dry_run"])
    bad.write_text("name: bad\ntrian: {}\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}: unknown key 'trian'"):
        reproduce.main(["--recipe", str(bad), "--dry_run"])
    with pytest.raises(UserError, match="--recipe nosuch: unknown recipe; use one of coco, mvtec, realiad, tiny, visa"):
        reproduce.main(["--recipe", "nosuch", "--dry_run"])


def test_run_main_turns_a_bad_recipe_into_one_error_line(capsys):
    from utils.cli import run_main

    assert run_main(reproduce.main, ["--recipe", "mvtec", "--dry_run", "train.epoch=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config override 'train.epoch=1'") and "\n" not in err


def test_help_is_fast_and_imports_no_torch():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "scripts" / "reproduce.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "--recipe" in out.stdout and "--launcher" in out.stdout
    assert not re.search(r"\| torch$", out.stderr, re.M)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reproduce") / "run"
    assert reproduce.main(["--recipe", "tiny", "--run_dir", str(run)]) == 0
    return run


def _outputs(run: Path) -> dict[str, float]:
    names = [
        "data/demo_dataset.json",
        "models/base_sd.ckpt",
        "mvtec_captions_template_pd/train_labels_mvtec_template.json",
        "autoencoder/autoencoder.ckpt",
        "models/vlmdiff.ckpt",
        "train/ckpt_tiny/model_epoch=001.ckpt",
        "results/tiny/metrics.json",
        "paper_table.md",
    ]
    return {n: (run / n).stat().st_mtime_ns for n in names}


def test_tiny_recipe_runs_every_stage_and_ends_in_the_paper_table(tiny_run):
    run = tiny_run
    metrics = json.loads((run / "results" / "tiny" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"legacy", "official"}
    md = (run / "paper_table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 90.6 | 95.7 | 94.2 | 95.9 | 51.8 | 53.6 | 89.4 |" in rows["paper (legacy protocol)"]
    for protocol, name in (
        ("legacy", "ours, legacy protocol (the paper's)"),
        ("official", "ours, official protocol (exact)"),
    ):
        mean = metrics[protocol]["mean"]
        cells = [c.strip() for c in rows[name].split("|")[2:9]]
        assert cells == [
            f"{100 * mean[k]:.1f}"
            for k in ("auroc_image", "ap_image", "f1max_image", "auroc_pixel", "ap_pixel", "f1max_pixel", "aupro")
        ]
    assert "| coffee | legacy |" in md and "| coffee | official |" in md
    assert (
        f"[1] test run {run}/results/tiny, checkpoint {run.resolve()}/train/ckpt_tiny/model_epoch=001.ckpt (epoch 2"
        in md
    )
    csv_lines = (run / "paper_table.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,table,class,row,auroc_image") and len(csv_lines) == 1 + 3 + 2
    assert "model_epoch=001.ckpt" in csv_lines[2]
    page = (run / "paper_table.html").read_text()
    assert "<table" in page and "href='results/tiny/report.html'" in page
    assert (run / "status" / "06_test.ok").is_file() and not list((run / "status").glob("*.failed"))


def test_a_rerun_skips_every_finished_stage(tiny_run, capsys):
    before = _outputs(tiny_run)
    capsys.readouterr()
    assert reproduce.main(["--recipe", "tiny", "--run_dir", str(tiny_run)]) == 0
    assert _outputs(tiny_run) == before
    assert "nothing to do: every stage is complete" in capsys.readouterr().err
    # without the report, only the report runs again
    (tiny_run / "paper_table.md").unlink()
    assert reproduce.main(["--recipe", "tiny", "--run_dir", str(tiny_run)]) == 0
    after = _outputs(tiny_run)
    assert {k: v for k, v in after.items() if k != "paper_table.md"} == {
        k: v for k, v in before.items() if k != "paper_table.md"
    }
    err = capsys.readouterr().err
    assert "=== 07_report" in err and "=== 06_test" not in err


def test_status_names_a_failed_local_stage(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "status").mkdir(parents=True)
    (run / "status" / "05_train.failed").write_text("2\n")
    assert reproduce.main(["--status", str(run)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("FAILED: stage 05_train exit code 2") and "\n" not in line
