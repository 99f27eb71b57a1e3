"""The SG network and controlled UNet reproduce upstream's tensors; SD-1.5 names match upstream."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixture_models import assert_close, build_controlled_unet, build_sg_network, build_vlmdiff
from vlmdiff.config import load_model_config
from vlmdiff.model import VLMDiff
from vlmdiff.sg_network import zero_initialised_modules


@pytest.fixture(scope="module")
def tiny_nets(fixtures_dir):
    return build_sg_network(fixtures_dir), build_controlled_unet(fixtures_dir)


def test_sff_channels_follow_the_fixture(tiny_nets, tiny_config):
    sgn, _ = tiny_nets
    assert sgn.down11[0].in_channels == tiny_config["sff_channels"]["in_from_outs6"]
    assert sgn.down21[0].in_channels == tiny_config["sff_channels"]["in_from_outs7_8_and_out"]
    assert (sgn.sources, sgn.targets) == ([6, 7, 8], [9, 10, 11])


def test_control_tensors_and_controlled_unet(fixtures_dir, tiny_nets):
    ref = torch.load(fixtures_dir / "unet_forward.pt")
    sgn, unet = tiny_nets
    with torch.no_grad():
        control = sgn(ref["x"], ref["hint"], ref["timesteps"], ref["context"])
        n = len([k for k in ref if k.startswith("control.")])
        assert len(control) == n
        for i in range(n):
            assert_close(control[i], ref[f"control.{i:02d}"], atol=1e-4, rtol=1e-4, what=f"control.{i:02d}")
        for only_mid, key in ((True, "eps_only_mid_control"), (False, "eps_all_control")):
            eps = unet(ref["x"], ref["timesteps"], ref["context"], list(control), only_mid)
            assert_close(eps, ref[key], atol=1e-4, rtol=1e-4, what=key)
        assert_close(
            unet(ref["x"], ref["timesteps"], ref["context"]),
            ref["eps_no_control"],
            atol=1e-4,
            rtol=1e-4,
            what="eps_no_control",
        )


def test_skipped_controls(fixtures_dir, tiny_nets):
    """Controls the UNet does not read can be left out (None); the others are unchanged, bit for bit."""
    ref = torch.load(fixtures_dir / "unet_forward.pt")
    sgn, _ = tiny_nets
    args = (ref["x"], ref["hint"], ref["timesteps"], ref["context"])
    with torch.no_grad():
        full = sgn(*args)
        part = sgn(*args, skip=range(6))
    assert [c is None for c in part] == [i < 6 for i in range(len(full))]
    assert all(torch.equal(a, b) for a, b in zip(full[6:], part[6:], strict=True))
    with pytest.raises(ValueError, match="SFF"):
        sgn(*args, skip=[6])


def test_sd15_vlmdiff_names_and_shapes(fixtures_dir):
    ref = {k: tuple(v) for k, v in json.loads((fixtures_dir / "sd15_vlmdiff_keys.json").read_text()).items()}
    with torch.device("meta"):
        model = VLMDiff(load_model_config("sd15"), load_pretrained_text=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: (ours[k], ref[k]) for k in ours if ours[k] != ref[k]} == {}
    n_sgn = sum(p.numel() for p in model.control_model.parameters())
    assert n_sgn == 471_871_120


def test_zero_init_and_trainable_split():
    torch.manual_seed(0)
    model = VLMDiff(load_model_config("tiny"))
    convs = zero_initialised_modules(model.control_model)
    assert len(convs) == 1 + 12 + 1 + 9
    assert all(c.weight.abs().sum() == 0 for c in convs)
    assert all(c.bias is None or c.bias.abs().sum() == 0 for c in convs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("control_model.", "model.diffusion_model.output_blocks.", "model.diffusion_model.out."))
        for n in trainable
    )
    assert any(n.startswith("control_model.") for n in trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.diffusion_model.input_blocks.") for n in frozen)
    assert any(n.startswith("model.diffusion_model.time_embed.") for n in frozen)


def test_vlmdiff_apply_model_matches_fixture(fixtures_dir):
    """The LightningModule's apply_model with the fixture weights reproduces eps_only_mid_control
    (leaving out the six controls only_mid_control does not read)."""
    ref = torch.load(fixtures_dir / "unet_forward.pt")
    model = build_vlmdiff(fixtures_dir)
    assert model.unused_controls() == list(range(6))
    with torch.no_grad():
        eps = model.apply_model(ref["x"], ref["timesteps"], {"context": ref["context"], "hint": ref["hint"]})
    assert_close(eps, ref["eps_only_mid_control"], atol=1e-4, rtol=1e-4, what="apply_model")
