"""Fixture tests take every size from the fixture folder (tests/fixture_models.py).

1. A fixture folder with other sizes (heads, context width, UNet and autoencoder widths, GroupNorm
   groups, schedule length) yields models of exactly those sizes through the helpers.
2. Statically: every test function that reads the fixture folder (takes ``fixtures_dir`` or
   ``tiny_config``) builds its models only through those helpers, never from a preset such as
   ``tiny`` (which would fail on another folder with a size mismatch instead of a numerical one).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.modules.attention import CrossAttention
from tests import fixture_models as fm
from vlmdiff.config import load_model_config

TESTS = Path(__file__).resolve().parent
READS_FIXTURES = {"fixtures_dir", "tiny_config"}
# Constructors that fix sizes: allowed in a fixture-reading test only on the meta device (SD-1.5
# name/shape checks) or when an argument comes from fixture_models.model_config.
SIZED = {
    "UNetModel",
    "AutoencoderKL",
    "SGNetwork",
    "ControlledUNet",
    "VLMDiff",
    "LatentDiffusion",
    "AutoencoderTraining",
    "UNetConfig",
    "AutoencoderConfig",
    "TextEncoderConfig",
    "CLIPTextArch",
    "VLMDiffConfig",
    "LatentDiffusionConfig",
    "UNet2DConditionModel",
    "CLIPTextModel",
}
PRESET_LOADERS = {"load_config", "load_model_config"}


@pytest.fixture()
def other_folder(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A copy of the fixture folder's configs with every size changed."""
    tiny = json.loads((fixtures_dir / "tiny_config.json").read_text())
    u = tiny["unet_and_sgn"]
    assert (u["num_heads"], u["context_dim"], u["model_channels"]) != (2, 16, 48)
    u.update(num_heads=2, context_dim=16, model_channels=48, channel_mult=[1, 2, 2, 2])
    tiny["groupnorm_groups"] = 16
    tiny["autoencoder"].update(ch=16, ch_mult=[1, 2, 2, 4], num_res_blocks=2)
    tiny["e2e"].update(H=64, W=64)
    (tmp_path / "tiny_config.json").write_text(json.dumps(tiny))
    misc = json.loads((fixtures_dir / "schedule_and_misc.json").read_text())
    misc["num_timesteps"] = 500
    (tmp_path / "schedule_and_misc.json").write_text(json.dumps(misc))
    return tmp_path


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_other_sizes_in_the_folder_give_models_of_those_sizes(other_folder: Path) -> None:
    torch.manual_seed(0)
    model = fm.build_vlmdiff(other_folder, weights=False)
    unet = model.model.diffusion_model
    assert unet.input_blocks[0][0].out_channels == 48
    assert [unet.input_blocks[i][0].out_layers[3].out_channels for i in (1, 4, 7, 10)] == [48, 96, 96, 96]
    attns = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert attns and {a.heads for a in attns} == {2}
    assert {a.to_k.in_features for n, a in model.named_modules() if n.endswith("attn2")} == {16}
    assert model.cond_stage_model.hidden_size == 16
    norms = [m for m in model.model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {16}
    enc = model.first_stage_model.encoder
    assert enc.conv_in.out_channels == 16 and len(enc.down[0].block) == 2
    assert [stage.block[-1].conv2.out_channels for stage in enc.down] == [16, 32, 32, 64]
    assert model.control_model.down11[0].in_channels == 96  # SFF from the level-3 controls
    assert model.num_timesteps == 500 and model.cfg.image_size == 64
    # the single-network helpers give the same sizes as the whole model
    assert _shapes(fm.build_unet(other_folder, weights=False)) == _shapes(unet)
    assert _shapes(fm.build_controlled_unet(other_folder, weights=False)) == _shapes(unet)
    assert _shapes(fm.build_sg_network(other_folder, weights=False)) == _shapes(model.control_model)
    assert _shapes(fm.build_autoencoder(other_folder, weights=False)) == _shapes(model.first_stage_model)
    # what the CLIs read with --config
    written = fm.write_model_config(other_folder, other_folder / "model.yaml")
    assert load_model_config(str(written)) == fm.model_config(other_folder)


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _on_meta(node: ast.With) -> bool:
    return any(
        isinstance(i.context_expr, ast.Call)
        and _name(i.context_expr.func) == "device"
        and any(isinstance(a, ast.Constant) and a.value == "meta" for a in i.context_expr.args)
        for i in node.items
    )


def _uses_fixture_config(call: ast.Call) -> bool:
    return any(
        isinstance(n, ast.Call) and _name(n.func) == "model_config"
        for arg in [*call.args, *(k.value for k in call.keywords)]
        for n in ast.walk(arg)
    )


def size_violations(source: str) -> tuple[list[str], list[str]]:
    """(fixture-reading functions checked, violations) of one test module's source.

    A function reads the fixtures if it takes ``fixtures_dir`` or ``tiny_config``; its body and the
    bodies of the module's own functions it calls are checked for a preset name ("tiny"), a preset
    loaded other than "sd15", and a sized constructor that is neither on the meta device nor given
    fixture_models.model_config.
    """
    tree = ast.parse(source)
    functions = {f.name: f for f in tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    readers = [f for f in functions.values() if READS_FIXTURES & {a.arg for a in f.args.args + f.args.kwonlyargs}]
    problems: list[str] = []

    def visit(node: ast.AST, where: str, meta: bool, seen: set[str]) -> None:
        if isinstance(node, ast.With):
            meta = meta or _on_meta(node)
        if isinstance(node, ast.Constant) and node.value == "tiny":
            problems.append(f"{where} line {node.lineno}: the 'tiny' preset instead of the fixture folder's sizes")
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in PRESET_LOADERS and not (
                node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "sd15"
            ):
                problems.append(f"{where} line {node.lineno}: {name}(...) other than 'sd15'")
            if name in SIZED and not meta and not _uses_fixture_config(node):
                problems.append(f"{where} line {node.lineno}: {name}(...) built outside tests/fixture_models.py")
            if isinstance(node.func, ast.Name) and name in functions and name not in seen:
                for stmt in functions[name].body:
                    visit(stmt, f"{where} -> {name}", meta, seen | {name})
        for child in ast.iter_child_nodes(node):
            visit(child, where, meta, seen)

    for f in readers:
        for stmt in f.body:
            visit(stmt, f.name, False, {f.name})
    return [f.name for f in readers], problems


def test_fixture_tests_build_models_only_from_the_folder() -> None:
    checked: dict[str, list[str]] = {}
    problems: list[str] = []
    for path in sorted(TESTS.rglob("test_*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        readers, found = size_violations(path.read_text())
        rel = path.relative_to(TESTS).as_posix()
        checked[rel] = readers
        problems += [f"{rel}: {p}" for p in found]
    assert problems == []
    # the check saw the tests that build models from fixture weights
    assert {"test_autoencoder_reproduces_fixture", "test_unet_math_attention_matches_sdpa"} <= set(
        checked["ldm/test_fixtures_core.py"]
    )
    assert {"tiny_nets", "test_vlmdiff_apply_model_matches_fixture"} <= set(checked["vlmdiff/test_model_fixtures.py"])
    assert "model" in checked["vlmdiff/test_reconstruction_fixtures.py"]
    assert "test_run_with_perceptual_weights_from_local_files" in checked["scripts/test_finetune_autoencoder.py"]


def test_the_static_check_catches_preset_sizes() -> None:
    """What the fixture tests did before: the text encoder and autoencoder from the tiny preset."""
    before = """
def run(args, config):
    main(["--config", "tiny", *args])

@pytest.fixture(scope="module")
def model(fixtures_dir, tiny_config):
    cfg = load_model_config("tiny")
    cfg = dataclasses.replace(cfg, unet=unet_config(tiny_config))
    return VLMDiff(cfg).eval()

def test_ae(fixtures_dir):
    ae = AutoencoderKL(load_config("sd15", LatentDiffusionConfig).autoencoder)
    run([], None)

def test_sd15_names(fixtures_dir):
    with torch.device("meta"):
        model = VLMDiff(load_model_config("sd15"))
    ok = AutoencoderTraining(model_config(fixtures_dir).autoencoder, AutoencoderTrainConfig())
"""
    readers, problems = size_violations(before)
    assert readers == ["model", "test_ae", "test_sd15_names"]
    assert [p.split(":")[1].strip() for p in problems] == [
        "load_model_config(...) other than 'sd15'",
        "the 'tiny' preset instead of the fixture folder's sizes",
        "VLMDiff(...) built outside tests/fixture_models.py",
        "AutoencoderKL(...) built outside tests/fixture_models.py",
        "the 'tiny' preset instead of the fixture folder's sizes",
    ]
    assert problems[-1].startswith("test_ae -> run line 3")
