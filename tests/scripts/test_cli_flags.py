"""Flags that read the same in every script: help with defaults, aliases, run files, --print_config."""

from __future__ import annotations

import argparse
import importlib

import pytest
import yaml

from ldm.checkpoint import save_checkpoint
from ldm.config import to_dict
from utils.cli import HelpFormatter, run_main
from utils.errors import UserError
from vlmdiff.config import load_model_config

SCRIPTS = ["captioner", "finetune_autoencoder", "build_model", "train", "test"]
MODULES = SCRIPTS + ["vlmdiff.evaluation.report", "vlmdiff.evaluation.metrics", "utils.prepare_coco_ad"]


@pytest.mark.parametrize("name", MODULES)
def test_every_flag_has_help_that_shows_its_default(name):
    parser = importlib.import_module(name).build_parser()
    assert parser.formatter_class is HelpFormatter
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name} {flag}: no help text"
        shown = formatter._get_help_string(action)
        if action.required:
            continue
        if action.default is None:  # worked out at run time: the help says what it defaults to
            assert "default" in shown, f"{name} {flag}: default None, and the help does not say what that means"
        else:
            assert "%(default)" in shown, f"{name} {flag}: the help does not show the default {action.default!r}"
    assert "(default:" in parser.format_help()


def _parse(name, *argv):
    return importlib.import_module(name).parse_args(list(argv))


DATA = ["--data_set", "mvtec", "--data_path", "data/mvtec"]


@pytest.mark.parametrize(
    "name, spellings, value",
    [
        ("train", ["bf16", "bf16-mixed"], "bf16-mixed"),
        ("train", ["16", "16-mixed"], "16-mixed"),
        ("finetune_autoencoder", ["bf16", "bf16-mixed"], "bf16-mixed"),
        ("test", ["bf16", "bf16-mixed"], "bf16"),
        ("test", ["32", "32-true"], "32"),
    ],
)
def test_precision_aliases_parse_to_the_same_value(name, spellings, value):
    assert {_parse(name, *DATA, "--precision", s).precision for s in spellings} == {value}


def test_protocol_aliases_parse_to_the_same_value():
    for flag in ("--protocol", "--metrics_protocol"):
        assert _parse("test", *DATA, flag, "legacy").metrics_protocol == "legacy"
        assert _parse("vlmdiff.evaluation.report", "run", flag, "legacy").protocol == "legacy"
        assert _parse("vlmdiff.evaluation.metrics", "x.npz", flag, "both").protocol == "both"


def _run_file(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_run_file_gives_defaults_and_the_command_line_wins(tmp_path):
    run = _run_file(
        tmp_path,
        "data_set: visa\ndata_path: data/visa\nbatch_size: 6\nlr: 2.0e-5\nuse_captions: true\n"
        "classes: [candle, pcb1]\nprecision: bf16\ndevices: 2\nconfig: tiny\n"
        "overrides: [unet.num_heads=2]\n",
    )
    args = _parse("train", "--config_file", str(run), "--batch_size", "4")
    assert (args.data_set, args.data_path, args.batch_size, args.lr) == ("visa", "data/visa", 4, 2e-5)
    assert (args.use_captions, args.classes, args.precision, args.devices) == (
        True,
        ["candle", "pcb1"],
        "bf16-mixed",
        2,
    )
    assert (args.config, args.overrides) == ("tiny", ["unet.num_heads=2"])
    aliases = _run_file(tmp_path, "data_path: d\nprotocol: legacy\n")  # a flag's other spelling is a key too
    assert _parse("test", "--config_file", str(aliases)).metrics_protocol == "legacy"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data_path: d\nbatchsize: 4\n", "run.yaml: unknown key 'batchsize': not a flag of "),
        ("data_path: d\nbatch_size: four\n", "run.yaml: key 'batch_size': expected an integer, got 'four'"),
        ("data_path: d\nbatch_size: 2.5\n", "run.yaml: key 'batch_size': expected an integer, got 2.5"),
        ("data_path: d\nlr: fast\n", "run.yaml: key 'lr': expected a number, got 'fast'"),
        ("data_path: d\nuse_captions: 1\n", "run.yaml: key 'use_captions': expected true or false, got 1"),
        ("data_path: d\ndata_set: kitti\n", "run.yaml: key 'data_set': 'kitti' is not one of "),
        ("data_path: d\nprecision: fp8\n", "run.yaml: key 'precision': 'fp8' is not one of "),
        ("data_path: d\nclasses: bottle\n", "run.yaml: key 'classes': expected a list, got 'bottle'"),
        ("data_path: [d, e]\n", "run.yaml: key 'data_path': expected a single value"),
        ("- data_path\n", "run.yaml: expected a mapping"),
        ("data_path: [d\n", "run.yaml: not valid YAML"),
    ],
)
def test_run_file_errors_are_one_line_naming_file_and_key(tmp_path, text, expected):
    run = _run_file(tmp_path, text)
    with pytest.raises(UserError) as err:
        _parse("train", "--config_file", str(run))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_run_file_error_through_the_script_is_exit_2_and_one_line(tmp_path, capsys):
    import build_model

    run = _run_file(tmp_path, "sd_path: sd.ckpt\nuse_emma: true\n")
    assert run_main(build_model.main, ["--config_file", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "use_emma" in err and str(run) in err and "\n" not in err


def _printed(capsys, module, argv):
    assert importlib.import_module(module).main(argv) is None
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_build_model(tmp_path, capsys):
    run = _run_file(tmp_path, "sd_path: nowhere/sd.ckpt\nconfig: tiny\n")
    out = _printed(
        capsys,
        "build_model",
        ["--config_file", str(run), "unet.num_heads=2", "--print_config", "--output", str(tmp_path / "x.ckpt")],
    )
    assert out["flags"]["sd_path"] == "nowhere/sd.ckpt" and out["flags"]["overrides"] == ["unet.num_heads=2"]
    assert out["model"] == to_dict(load_model_config("tiny", ["unet.num_heads=2"]))
    assert "print_config" not in out["flags"] and not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize("module", ["train", "test"])
def test_print_config_train_and_test_show_the_checkpoint_config(tmp_path, capsys, module):
    ckpt = tmp_path / "model.ckpt"
    stored = to_dict(load_model_config("tiny", ["unet.num_heads=2"]))
    save_checkpoint(ckpt, {}, config=stored)
    out = _printed(capsys, module, [*DATA, "--resume_path", str(ckpt), "--print_config", "--precision", "bf16"])
    assert out["model"] == stored and out["flags"]["resume_path"] == str(ckpt)
    assert out["flags"]["precision"] == ("bf16-mixed" if module == "train" else "bf16")
    out = _printed(capsys, module, [*DATA, "--config", "tiny", "diffusion.timesteps=100", "--print_config"])
    assert out["model"]["diffusion"]["timesteps"] == 100 and out["model"]["unet"]["model_channels"] == 32


def test_print_config_captioner_and_finetune_autoencoder(tmp_path, capsys):
    out = _printed(capsys, "captioner", [*DATA, "--vlm_model", "template", "--print_config"])
    assert out["flags"]["vlm_model"] == "template" and out["flags"]["batch_size"] == 1
    out = _printed(
        capsys,
        "finetune_autoencoder",
        [*DATA, "--config", "tiny", "--kl_weight", "0.5", "--print_config", "--output_dir", str(tmp_path / "run")],
    )
    assert out["autoencoder"]["ch"] == 32 and out["finetune"]["loss"]["kl_weight"] == 0.5
    assert out["finetune"]["max_steps"] == 60001 and out["image_size"] == 128
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "module, argv",
    [
        ("captioner", [*DATA, "--vlm_model", "template", "--end_ind", "-1", "--split", "test"]),
        (
            "finetune_autoencoder",
            [*DATA, "--config", "tiny", "--kl_weight", "0.5", "--classes", "bottle", "--precision", "bf16"],
        ),
        ("build_model", ["--config", "tiny", "--use_ema", "unet.num_heads=2"]),
        ("train", [*DATA, "--config", "tiny", "--use_captions", "--lr", "3e-5", "--devices", "2", "--precision", "16"]),
        ("test", [*DATA, "--config", "tiny", "--protocol", "both", "--sigma", "4", "--end_ind", "7"]),
    ],
)
def test_printed_flags_work_as_a_run_file(tmp_path, capsys, module, argv):
    flags = _printed(capsys, module, [*argv, "--print_config"])["flags"]
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(flags))
    again = _printed(capsys, module, ["--config_file", str(run), "--print_config"])["flags"]
    assert again == flags
