"""train.py: loss goes down, frozen weights stay, checkpoints carry config/provenance, bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

import train
import vlmdiff.training
from ldm.checkpoint import load_checkpoint
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff.model import TRAINABLE
from vlmdiff.training import AppendingCSVLogger

FAST = [
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("train"), n_train=4, n_test_good=1, n_test_defect=1)


def _losses(ckpt_dir: Path) -> list[float]:
    with open(ckpt_dir / "logs" / "metrics.csv") as f:
        return [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]


def test_training_reduces_loss_and_touches_only_trainable(setup):
    tmp, data, start = setup
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
            "fit",
            "--max_steps",
            "30",
            "--lr",
            "2e-3",
            "--save_every_n_steps",
            "30",
            "--seed",
            "3",
            *FAST,
        ]
    )
    losses = _losses(ckpt_dir)
    assert len(losses) == 30
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    before = load_checkpoint(start)["state_dict"]
    final = load_checkpoint(ckpt_dir / "last.ckpt")
    after = final["state_dict"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(TRAINABLE) for k in changed)
    assert any(k.startswith("control_model.") for k in changed)
    assert any(k.startswith("model.diffusion_model.output_blocks.") for k in changed)
    for k in before:
        if k.startswith(
            (
                "first_stage_model.",
                "cond_stage_model.",
                "model.diffusion_model.input_blocks.",
                "model.diffusion_model.middle_block.",
                "model.diffusion_model.time_embed.",
            )
        ):
            assert torch.equal(before[k], after[k]), k
    assert final["config"]["unet"]["model_channels"] == 32
    assert final["provenance"]["seed"] == 3 and "torch" in final["provenance"]["versions"]
    assert final["global_step"] == 30 and final["optimizer_states"]


def test_bad_inputs(setup, tmp_path):
    tmp, data, start = setup
    base = ["--data_set", "mvtec", "--data_path", str(data), "--output_root", str(tmp_path), "--max_steps", "1", *FAST]
    with pytest.raises(UserError, match="caption"):
        train.main(base + ["--resume_path", str(start), "--use_captions", "--caption_folder", str(tmp_path / "none")])
    not_ckpt = tmp_path / "notes.ckpt"
    not_ckpt.write_text("hello")
    with pytest.raises(UserError, match="notes.ckpt"):
        train.main(base + ["--resume_path", str(not_ckpt)])
    with pytest.raises(UserError, match="another model config"):
        train.main(base + ["--resume_path", str(start), "--config", "tiny", "unet.num_heads=2"])
    ae_only = tmp / "ae.ckpt"
    with pytest.raises(UserError, match="ae.ckpt"):
        train.main(base + ["--resume_path", str(ae_only), "--config", "tiny"])
    empty = tmp_path / "empty" / "brick" / "train" / "good"
    empty.mkdir(parents=True)
    (tmp_path / "empty" / "brick" / "test" / "good").mkdir(parents=True)
    with pytest.raises(UserError):
        train.main(
            [
                "--data_set",
                "mvtec",
                "--data_path",
                str(tmp_path / "empty"),
                "--output_root",
                str(tmp_path),
                "--resume_path",
                str(start),
                *FAST,
            ]
        )
    with pytest.raises(UserError, match="--resume"):
        train.main(base + ["--resume", "--exp_name", "never_ran"])


def _periodic(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("model_epoch=*.ckpt"))


def test_checkpoints_use_upstream_names_and_period(setup):
    tmp, data, start = setup
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
            "names",
            "--max_epochs",
            "4",
            "--save_every_n_epochs",
            "2",
            *FAST,
        ]
    )
    assert ckpt_dir == tmp / "ckpt_names"
    assert _periodic(ckpt_dir) == ["model_epoch=001.ckpt", "model_epoch=003.ckpt"]  # 0-based epoch index
    assert (ckpt_dir / "last.ckpt").is_file()
    assert load_checkpoint(ckpt_dir / "model_epoch=001.ckpt")["epoch"] == 1


class _RecordingTrainer:
    """Stands in for the Lightning Trainer: records the callbacks train.py hands it, trains nothing."""

    is_global_zero = False  # no end-of-run summary to write

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def fit(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("dataset,every", [("mvtec", 25), ("real_iad", 20)])
def test_default_checkpoint_period_is_upstreams(dataset, every, setup, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests import datagen

    tmp, data, start = setup
    if dataset == "real_iad":
        data = datagen.make_realiad(tmp_path, classes=("toy",))
    made = []
    monkeypatch.setattr(
        vlmdiff.training,
        "make_trainer",
        lambda options, ckpt_dir, callbacks: made.append(_RecordingTrainer(callbacks)) or made[-1],
    )
    train.main(
        [
            "--data_set",
            dataset,
            "--data_path",
            str(data),
            "--resume_path",
            str(start),
            "--output_root",
            str(tmp_path),
            *FAST,
        ]
    )
    (saver,) = [c for c in made[0].callbacks if isinstance(c, ModelCheckpoint)]
    assert saver._every_n_epochs == every and saver.save_top_k == -1 and saver.save_last


def test_keep_last_n_keeps_the_newest_periodic_checkpoints_and_last(setup):
    tmp, data, start = setup
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
            "keep",
            "--max_epochs",
            "5",
            "--save_every_n_epochs",
            "1",
            "--keep_last_n",
            "2",
            *FAST,
        ]
    )
    assert _periodic(ckpt_dir) == ["model_epoch=003.ckpt", "model_epoch=004.ckpt"]
    last = load_checkpoint(ckpt_dir / "last.ckpt")
    assert last["epoch"] == 4 and last["optimizer_states"]
    assert not list(ckpt_dir.glob("*.tmp"))
    with pytest.raises(UserError, match="--keep_last_n 0 must be 1 or more"):
        train.main(["--data_set", "mvtec", "--data_path", str(data), "--keep_last_n", "0"])


def test_resume_appends_to_the_logs_and_progress_is_plain_lines(setup, capsys):
    tmp, data, start = setup
    not_a_terminal = [a for a in FAST if a != "--no_progress_bar"]  # pytest captures stderr: no terminal
    base = [
        "--data_set",
        "mvtec",
        "--data_path",
        str(data),
        "--output_root",
        str(tmp),
        "--exp_name",
        "resumed",
        "--save_every_n_steps",
        "3",
        "--log_interval",
        "0",
        *not_a_terminal,
    ]
    ckpt_dir = train.main(base + ["--resume_path", str(start), "--max_steps", "3"])
    first_rows = _losses(ckpt_dir)
    first_events = sorted(p.name for p in (ckpt_dir / "logs").glob("events.out.tfevents.*"))
    assert len(first_rows) == 3 and first_events
    err = capsys.readouterr().err
    steps = re.findall(
        r"train epoch 1/300: step (\d)/3 \(\d+%\) \| loss ([\d.]+) \| [\d.]+ (?:step/s|s/step) \| "
        r"elapsed [\d:]+ \| ETA [\d:]+",
        err,
    )
    assert [s for s, _ in steps] == ["1", "2", "3"]  # a line per step at --log_interval 0
    assert float(steps[0][1]) == pytest.approx(first_rows[0], rel=1e-3)
    assert "━" not in err and "\r" not in err  # no bar
    assert f"done after 3 steps (epoch 1): {ckpt_dir / 'last.ckpt'}" in err
    assert "1 periodic checkpoint(s) up to step=0000003.ckpt" in err and str(ckpt_dir / "logs" / "metrics.csv") in err
    assert "Tip" not in err and "eval mode" not in err and "| Name" not in err

    train.main(base + ["--resume", "--max_steps", "5"])
    rows = _losses(ckpt_dir)
    assert rows[:3] == first_rows and len(rows) == 5  # the first run's rows, then steps 4 and 5
    with open(ckpt_dir / "logs" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")] == [0, 1, 2, 3, 4]
    events = sorted(p.name for p in (ckpt_dir / "logs").glob("events.out.tfevents.*"))
    assert set(first_events) < set(events)
    assert re.findall(r"step (\d)/5 \(", capsys.readouterr().err) == ["4", "5"]


def test_appending_csv_logger_keeps_rows_when_columns_are_added(tmp_path):
    first = AppendingCSVLogger(tmp_path, name="logs", version="")
    first.log_metrics({"loss": 1.0}, step=0)
    first.save()
    second = AppendingCSVLogger(tmp_path, name="logs", version="")  # a resumed run that logs one more column
    second.log_metrics({"loss": 0.5, "lr": 0.1}, step=1)
    second.save()
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"loss": "1.0", "lr": "", "step": "0"}, {"loss": "0.5", "lr": "0.1", "step": "1"}]
