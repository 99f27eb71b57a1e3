"""Configs: presets by name, base chains, dotted overrides, strict validation with clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from ldm.config import LatentDiffusionConfig, UNetConfig, apply_overrides, from_dict, load_config, to_dict
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from utils.errors import UserError


@pytest.mark.parametrize("name", ["sd15", "mid", "tiny"])
def test_presets_load(name):
    cfg = load_config(name, LatentDiffusionConfig, only_own_sections=True)
    assert cfg.unet.context_dim == cfg.text_encoder.clip_arch.hidden_size
    assert from_dict(LatentDiffusionConfig, to_dict(cfg)) == cfg


def test_preset_sizes():
    sd15 = load_config("sd15", LatentDiffusionConfig, only_own_sections=True)
    assert (sd15.unet.model_channels, sd15.unet.channel_mult, sd15.unet.context_dim) == (320, (1, 2, 4, 4), 768)
    assert (sd15.autoencoder.ch, sd15.autoencoder.ch_mult, sd15.image_size) == (128, (1, 2, 4, 4), 256)
    mid = load_config("mid", LatentDiffusionConfig, only_own_sections=True)
    assert (mid.unet.model_channels, mid.autoencoder.ch, mid.unet.context_dim, mid.image_size) == (128, 64, 768, 256)
    tiny = load_config("tiny", LatentDiffusionConfig, only_own_sections=True)
    assert (tiny.unet.model_channels, tiny.unet.channel_mult) == (32, (1, 1, 1, 1))


def test_overrides_and_errors(tmp_path):
    cfg = load_config("tiny", LatentDiffusionConfig, ["unet.num_heads=2", "image_size=64"], only_own_sections=True)
    assert cfg.unet.num_heads == 2 and cfg.image_size == 64
    with pytest.raises(UserError, match="unknown key .unet.num_head. "):
        load_config("tiny", LatentDiffusionConfig, ["unet.num_head=2"], only_own_sections=True)
    with pytest.raises(UserError, match="must look like"):
        apply_overrides({}, ["unet.num_heads"])
    with pytest.raises(UserError, match="unet.model_channels: expected int"):
        load_config("tiny", LatentDiffusionConfig, ["unet.model_channels=wide"], only_own_sections=True)
    with pytest.raises(UserError, match="unknown config preset 'huge'"):
        load_config("huge", LatentDiffusionConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nunet:\n  channels: 3\n")
    with pytest.raises(UserError) as err:
        load_config(str(bad), LatentDiffusionConfig, only_own_sections=True)
    assert "bad.yaml" in str(err.value) and "channels" in str(err.value)


def test_group_count_must_divide_channels():
    with pytest.raises(UserError, match="norm_groups"):
        UNetModel(dataclasses.replace(UNetConfig(), model_channels=40, norm_groups=32))
    tiny = load_config("tiny", LatentDiffusionConfig, only_own_sections=True)
    with pytest.raises(UserError, match="autoencoder"):
        AutoencoderKL(dataclasses.replace(tiny.autoencoder, ch=24))
    small = dataclasses.replace(tiny.unet, model_channels=16, norm_groups=8, num_heads=2)
    assert UNetModel(small).out[0].num_groups == 8  # the group count comes from the config
