"""train.py and its checkpoint folder: a new run never replaces another run's checkpoints unless told to, and
--keep_last_n also prunes the checkpoints written before a --resume."""

from __future__ import annotations

from pathlib import Path

import pytest

import train
from tests.tinyckpt import demo_data_and_model
from utils.cli import run_main
from utils.errors import UserError
from vlmdiff.training_checkpoints import periodic_checkpoints

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
    "--save_every_n_epochs",
    "1",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("folder"), n_train=1, n_test_good=1, n_test_defect=1)


def _argv(data: Path, root: Path, *extra: str) -> list[str]:
    return ["--data_set", "mvtec", "--data_path", str(data), "--output_root", str(root), "--exp_name", "run", *FAST] + [
        *extra
    ]


def _names(ckpt_dir: Path) -> list[str]:
    return [p.name for p in periodic_checkpoints(ckpt_dir)]


def test_a_new_run_does_not_replace_an_older_runs_checkpoints(setup, tmp_path, capsys):
    _, data, start = setup
    ckpt_dir = train.main(_argv(data, tmp_path, "--resume_path", str(start), "--max_epochs", "2"))
    assert _names(ckpt_dir) == ["model_epoch=000.ckpt", "model_epoch=001.ckpt"]
    (ckpt_dir / "last.ckpt").unlink()  # to free disk
    before = {p.name: p.read_bytes() for p in ckpt_dir.glob("*.ckpt")}
    capsys.readouterr()
    assert run_main(train.main, _argv(data, tmp_path, "--resume_path", str(start), "--max_epochs", "1")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"{ckpt_dir} holds another run's checkpoints (2, e.g. model_epoch=001.ckpt)" in errors[0]
    assert "--resume" in errors[0] and "--exp_name" in errors[0] and "--overwrite" in errors[0]
    assert {p.name: p.read_bytes() for p in ckpt_dir.glob("*.ckpt")} == before  # untouched

    train.main(_argv(data, tmp_path, "--resume_path", str(start), "--max_epochs", "1", "--overwrite"))
    assert _names(ckpt_dir) == ["model_epoch=000.ckpt"] and (ckpt_dir / "last.ckpt").is_file()
    assert (ckpt_dir / "model_epoch=000.ckpt").read_bytes() != before["model_epoch=000.ckpt"]  # the new run's
    with pytest.raises(UserError, match="holds another run's checkpoints"):  # last.ckpt alone counts too
        train.main(_argv(data, tmp_path, "--resume_path", str(start), "--max_epochs", "1"))


def test_keep_last_n_prunes_the_checkpoints_of_before_a_resume(setup, tmp_path, capsys):
    _, data, start = setup
    ckpt_dir = train.main(_argv(data, tmp_path, "--resume_path", str(start), "--max_epochs", "3"))
    assert _names(ckpt_dir) == ["model_epoch=000.ckpt", "model_epoch=001.ckpt", "model_epoch=002.ckpt"]
    train.main(_argv(data, tmp_path, "--resume", "--max_epochs", "4", "--keep_last_n", "2"))
    assert _names(ckpt_dir) == ["model_epoch=002.ckpt", "model_epoch=003.ckpt"]
    assert (ckpt_dir / "last.ckpt").is_file()
    assert f"--keep_last_n 2: removed {ckpt_dir / 'model_epoch=000.ckpt'}" in capsys.readouterr().err
