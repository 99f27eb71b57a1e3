"""build_model.py assembles a VLMDiff checkpoint from SD-style and Lightning-style files."""

from __future__ import annotations

import pytest
import torch

import build_model
from ldm.checkpoint import load_checkpoint
from tests.tinyckpt import write_ae_checkpoint, write_sd_checkpoint
from utils.cli import run_main
from utils.errors import UserError
from vlmdiff.checkpoint import load_vlmdiff
from vlmdiff.sg_network import zero_initialised_modules


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    return write_sd_checkpoint(tmp / "sd.ckpt"), write_ae_checkpoint(tmp / "ae.ckpt"), tmp


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_assembly_rules(inputs, ext):
    sd_path, ae_path, tmp = inputs
    out = tmp / f"vlmdiff{ext}"
    build_model.main(["--sd_path", str(sd_path), "--ae_path", str(ae_path), "--output", str(out), "--config", "tiny"])
    sd = torch.load(sd_path)["state_dict"]
    ae = torch.load(ae_path, weights_only=False)["state_dict"]
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["unet"]["model_channels"] == 32
    w = ckpt["state_dict"]
    twins = [k for k in w if k.startswith("control_model.") and "model.diffusion_model." + k[14:] in sd]
    assert len(twins) > 100
    for k in twins:
        assert torch.equal(w[k], sd["model.diffusion_model." + k[14:]]), k
    for k in [k for k in w if k.startswith("first_stage_model.")]:
        assert torch.equal(w[k], ae[k[len("first_stage_model.") :]]), k
    assert torch.equal(w["model.diffusion_model.out.2.weight"], sd["model.diffusion_model.out.2.weight"])
    assert torch.equal(w["logvar"], torch.zeros(1000))

    model, _ = load_vlmdiff(out)
    assert all(c.weight.abs().sum() == 0 for c in zero_initialised_modules(model.control_model))
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 5])
    ctx, hint = torch.randn(2, 77, 24), torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        eps = model.apply_model(x, t, {"context": ctx, "hint": hint})
        plain = model.model.diffusion_model(x, t, ctx)  # no control at all
    assert torch.equal(eps, plain)


def test_ema_weights_are_taken_when_asked(inputs):
    sd_path, ae_path, tmp = inputs
    out = tmp / "ema.ckpt"
    build_model.main(
        ["--sd_path", str(sd_path), "--ae_path", str(ae_path), "--output", str(out), "--config", "tiny", "--use_ema"]
    )
    sd = torch.load(sd_path)["state_dict"]
    w = load_checkpoint(out)["state_dict"]
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(w[k], sd[k] * 0.5)
    assert torch.equal(w["control_model.input_blocks.1.0.in_layers.2.weight"], sd[k] * 0.5)


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_broken_sd_checkpoint_is_one_clear_line(inputs, damage, capsys):
    sd_path, ae_path, tmp = inputs
    ckpt = torch.load(sd_path)
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    if damage == "missing":
        del ckpt["state_dict"][key]
    else:
        ckpt["state_dict"][key] = torch.zeros(2, 2)
    bad = tmp / f"bad_{damage}.ckpt"
    torch.save(ckpt, bad)
    out = tmp / "never.ckpt"
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_model.main(["--sd_path", str(bad), "--ae_path", str(ae_path), "--output", str(out), "--config", "tiny"])
    code = run_main(
        build_model.main, ["--sd_path", str(bad), "--ae_path", str(ae_path), "--output", str(out), "--config", "tiny"]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and key in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_other_config_and_missing_files(inputs, tmp_path):
    sd_path, ae_path, _ = inputs
    with pytest.raises(UserError, match="shape"):  # tiny weights, SD-1.5-size config built on meta
        build_model.main(
            [
                "--sd_path",
                str(sd_path),
                "--ae_path",
                str(ae_path),
                "--output",
                str(tmp_path / "x.ckpt"),
                "--config",
                "tiny",
                "unet.model_channels=64",
            ]
        )
    with pytest.raises(UserError, match="--ae_path"):
        build_model.main(
            [
                "--sd_path",
                str(sd_path),
                "--ae_path",
                str(tmp_path / "none.ckpt"),
                "--config",
                "tiny",
                "--output",
                str(tmp_path / "x.ckpt"),
            ]
        )
    with pytest.raises(UserError, match="does not exist"):
        build_model.main(
            ["--sd_path", str(tmp_path / "sd.ckpt"), "--config", "tiny", "--output", str(tmp_path / "x.ckpt")]
        )


def test_checkpoint_from_other_config_is_refused(inputs):
    sd_path, ae_path, tmp = inputs
    out = tmp / "cfg.ckpt"
    build_model.main(["--sd_path", str(sd_path), "--ae_path", str(ae_path), "--output", str(out), "--config", "tiny"])
    with pytest.raises(UserError, match="another model config"):
        load_vlmdiff(out, config="tiny", overrides=["unet.num_heads=2"])
