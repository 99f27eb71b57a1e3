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


# ------------------------------------------------------------------ new names, the recipe, resolved values


@pytest.mark.parametrize(
    "module, new, old, argv",
    [
        ("train", "--run_file", "--config_file", DATA),
        ("captioner", "--run_file", "--config_file", DATA),
        ("finetune_autoencoder", "--recipe", "--train_config", DATA),
    ],
)
def test_renamed_flags_keep_their_old_spelling_and_help_shows_the_new(tmp_path, module, new, old, argv):
    parser = importlib.import_module(module).build_parser()
    help_text = parser.format_help()
    assert new in help_text and old not in help_text
    if new == "--run_file":
        run = _run_file(tmp_path, "batch_size: 3\n")
        assert {_parse(module, *argv, flag, str(run)).batch_size for flag in (new, old)} == {3}
        assert _parse(module, *argv, old, str(run)).run_file == str(run)
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("batch_size: 5\n")
        import finetune_autoencoder

        for flag in (new, old):
            args = _parse(module, *argv, flag, str(recipe))
            assert args.recipe == str(recipe) and finetune_autoencoder.train_config_from_args(args).batch_size == 5
        assert _parse(module, *argv).recipe == "autoencoder"


def test_a_run_file_may_use_the_old_key_of_a_renamed_flag(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("kl_weight: 0.25\n")
    run = _run_file(tmp_path, f"train_config: {recipe}\n")
    assert _parse("finetune_autoencoder", *DATA, "--run_file", str(run)).recipe == str(recipe)


def test_the_training_recipe_file_holds_todays_defaults():
    """configs/train.yaml gives train.py the paper's settings it had as hard-coded defaults."""
    import train
    from vlmdiff.cli import load_train_recipe

    recipe = load_train_recipe()
    assert (recipe.lr, recipe.weight_decay, recipe.batch_size, recipe.accumulate_grad_batches, recipe.seed) == (
        1e-5,
        0.01,
        12,
        4,
        1,
    )
    assert recipe.max_epochs == {"mvtec": 300, "visa": 300, "realiad": 100, "coco": 100}
    assert recipe.save_every_n_epochs == {"mvtec": 25, "visa": 25, "realiad": 20, "coco": 20}
    expected = {"mvtec": (300, 25), "visa": (300, 25), "real_iad": (100, 20), "realiad": (100, 20), "coco": (100, 20)}
    for dataset, (epochs, every) in expected.items():
        args = train.resolve_defaults(_parse("train", "--data_set", dataset, "--data_path", "d"))
        assert (args.lr, args.weight_decay, args.batch_size, args.accumulate_grad_batches, args.seed) == (
            1e-5,
            0.01,
            12,
            4,
            1,
        )
        assert (args.max_epochs, args.save_every_n_epochs) == (epochs, every)
    flags = _parse("train", *DATA, "--max_epochs", "7", "--save_every_n_epochs", "3", "--lr", "2e-5")
    assert (train.resolve_defaults(flags).max_epochs, flags.save_every_n_epochs, flags.lr) == (7, 3, 2e-5)
    by_steps = train.resolve_defaults(_parse("train", *DATA, "--save_every_n_steps", "50"))
    assert by_steps.save_every_n_epochs is None  # saving by steps: no epoch period


def test_a_recipe_without_a_key_is_one_error_naming_it(tmp_path):
    from vlmdiff.cli import load_train_recipe

    partial = tmp_path / "partial.yaml"
    partial.write_text("lr: 1.0e-5\nweight_decay: 0.01\nbatch_size: 12\nseed: 1\n")
    with pytest.raises(UserError, match="accumulate_grad_batches"):
        load_train_recipe(str(partial))


def test_print_config_shows_the_values_the_run_will_use(tmp_path, capsys):
    flags = _printed(capsys, "train", ["--data_set", "real_iad", "--data_path", "d", "--print_config"])["flags"]
    assert (flags["max_epochs"], flags["save_every_n_epochs"], flags["exp_name"]) == (100, 20, "vlmdiff_realiad")
    flags = _printed(capsys, "test", [*DATA, "--print_config"])["flags"]
    assert (flags["feature_extractor"], flags["output_dir"], flags["exp_name"]) == (
        "resnet50",
        "results/vlmdiff_mvtec",
        "vlmdiff_mvtec",
    )
    flags = _printed(capsys, "test", [*DATA, "--use_dino", "--exp_name", "x", "--print_config"])["flags"]
    assert (flags["feature_extractor"], flags["output_dir"]) == ("dino_v1s8", "results/x")
    out = _printed(capsys, "finetune_autoencoder", [*DATA, "--config", "tiny", "--coco_part", "1", "--print_config"])
    assert out["flags"]["output_dir"] == "runs/autoencoder_mvtec"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "module, argv",
    [
        ("train", [*DATA, "--devices", "0,1", "--classes", "a", "b", "--config", "tiny", "unet.num_heads=2"]),
        ("train", [*DATA, "--devices", "-1", "--max_epochs", "5"]),
        ("finetune_autoencoder", [*DATA, "--config", "tiny", "--devices", "0,1", "--classes", "bottle", "grid"]),
        ("test", [*DATA, "--classes", "bottle", "grid", "--config", "tiny", "diffusion.timesteps=100"]),
    ],
)
def test_printed_flags_with_lists_load_back_as_the_same_run(tmp_path, capsys, module, argv):
    flags = _printed(capsys, module, [*argv, "--print_config"])["flags"]
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(flags))
    again, direct = _parse(module, "--run_file", str(run)), _parse(module, *argv)
    if module == "train":  # the printed flags hold the values resolved for the dataset (epochs, run name)
        import train

        direct = train.resolve_defaults(direct)
    keys = [k for k in ("devices", "classes", "overrides", "config", "max_epochs") if hasattr(direct, k)]
    assert "classes" in keys and {k: getattr(again, k) for k in keys} == {k: getattr(direct, k) for k in keys}
    assert _printed(capsys, module, ["--run_file", str(run), "--print_config"])["flags"] == flags


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("2", 2), ("-1", -1), ("0,1", [0, 1]), ("3,", [3])])
def test_one_devices_parser(value, expected):
    from vlmdiff.cli import parse_devices

    assert parse_devices(value) == expected
    for module in ("train", "finetune_autoencoder"):
        assert _parse(module, *DATA, "--devices", value).devices == expected
    with pytest.raises(UserError, match="--devices must be a number"):
        parse_devices("two")


@pytest.mark.parametrize("module", ["captioner", "finetune_autoencoder", "build_model", "train", "test"])
def test_every_script_takes_the_registry_dataset_names_and_aliases(module):
    from vlmdiff.data.registry import ALIASES, LABELLED, canonical_name

    choices = next(a.choices for a in importlib.import_module(module).build_parser()._actions if a.dest == "data_set")
    assert set(LABELLED) | {alias for alias, _ in ALIASES} <= set(choices)
    assert all(canonical_name(c) in (*LABELLED, "folder") for c in choices)
    assert canonical_name("real_iad") == "realiad"
