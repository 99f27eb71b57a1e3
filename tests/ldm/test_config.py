"""Configs: OmegaConf structured presets by name, base chains, dotlist overrides, one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from ldm.config import LatentDiffusionConfig, UNetConfig, from_dict, load_config, to_dict
from ldm.models.autoencoder import load_train_config
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from utils.errors import UserError
from vlmdiff.config import VLMDiffConfig, load_model_config

# The tiny VLMDiff config exactly as checkpoints store it (plain dict, lists for tuples), written
# before configs went through OmegaConf: checkpoints made then must keep loading.
STORED_TINY = {
    "image_size": 128,
    "unet": {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "channel_mult": [1, 1, 1, 1],
        "num_res_blocks": 2,
        "attention_resolutions": [4, 2, 1],
        "num_heads": 4,
        "num_head_channels": -1,
        "transformer_depth": 1,
        "context_dim": 24,
        "norm_groups": 32,
        "dropout": 0.0,
        "use_linear_in_transformer": False,
        "use_checkpoint": False,
        "attention": "sdpa",
    },
    "autoencoder": {
        "embed_dim": 4,
        "z_channels": 4,
        "double_z": True,
        "resolution": 128,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
        "norm_groups": 32,
    },
    "text_encoder": {
        "kind": "clip",
        "pretrained": None,
        "tokenizer": "bundled",
        "max_length": 77,
        "clip_arch": {
            "vocab_size": 49408,
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05,
        },
    },
    "diffusion": {
        "timesteps": 1000,
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "scale_factor": 0.18215,
        "logvar_init": 0.0,
    },
    "control": {
        "hint_channels": 3,
        "hint_block_channels": [16, 16, 32, 32, 96, 96, 256],
        "hint_stride2_convs": [2, 4, 6],
        "only_mid_control": True,
        "use_sff": True,
    },
}


@pytest.mark.parametrize("name", ["sd15", "mid", "tiny", "demo"])
def test_presets_load(name):
    cfg = load_config(name, LatentDiffusionConfig, only_own_sections=True)
    assert cfg.unet.context_dim in (cfg.text_encoder.clip_arch.hidden_size, 384)
    assert from_dict(LatentDiffusionConfig, to_dict(cfg)) == cfg
    assert isinstance(cfg.unet.channel_mult, tuple)  # the frozen dataclass, not an OmegaConf node


def test_preset_sizes_and_base_chain():
    sd15 = load_config("sd15", LatentDiffusionConfig, only_own_sections=True)
    assert (sd15.unet.model_channels, sd15.unet.channel_mult, sd15.unet.context_dim) == (320, (1, 2, 4, 4), 768)
    assert (sd15.autoencoder.ch, sd15.autoencoder.ch_mult, sd15.image_size) == (128, (1, 2, 4, 4), 256)
    mid = load_config("mid", LatentDiffusionConfig, only_own_sections=True)
    assert (mid.unet.model_channels, mid.autoencoder.ch, mid.unet.context_dim, mid.image_size) == (128, 64, 768, 256)
    tiny = load_config("tiny", LatentDiffusionConfig, only_own_sections=True)
    assert (tiny.unet.model_channels, tiny.unet.channel_mult) == (32, (1, 1, 1, 1))
    demo = load_model_config("demo")  # demo -> tiny -> sd15: each level keeps what it does not override
    assert (demo.image_size, demo.unet.model_channels, demo.unet.context_dim, demo.unet.num_res_blocks) == (
        64,
        32,
        384,
        2,
    )


def test_stored_config_dict_loads():
    cfg = from_dict(VLMDiffConfig, STORED_TINY, "old.ckpt (stored config)")
    assert cfg == load_model_config("tiny")
    assert to_dict(cfg) == STORED_TINY
    older = {k: v for k, v in STORED_TINY.items() if k != "control"}  # a key added later takes its default
    assert from_dict(VLMDiffConfig, older).control == load_model_config("tiny").control


def test_dotlist_overrides():
    cfg = load_config(
        "tiny",
        LatentDiffusionConfig,
        ["unet.num_heads=2", "image_size=64", "unet.channel_mult=[1,2]", "text_encoder.pretrained=some/folder"],
        only_own_sections=True,
    )
    assert (cfg.unet.num_heads, cfg.image_size, cfg.unet.channel_mult) == (2, 64, (1, 2))
    assert cfg.text_encoder.pretrained == "some/folder"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("unet.num_head=2", "config override 'unet.num_head=2': unknown key 'unet.num_head' "),
        ("unet.model_channels=wide", "config override 'unet.model_channels=wide': key 'unet.model_channels': "),
        ("unet.channel_mult=[a]", "key 'unet.channel_mult'"),
        ("unet.use_checkpoint=maybe", "key 'unet.use_checkpoint'"),
        ("unet.num_heads", "config override 'unet.num_heads' must look like key.sub=value"),
    ],
)
def test_override_errors_are_one_line_naming_the_key(override, expected):
    with pytest.raises(UserError) as err:
        load_model_config("tiny", [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_file_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(UserError, match="unknown config preset 'huge'"):
        load_config("huge", LatentDiffusionConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nunet:\n  channels: 3\n")
    with pytest.raises(UserError) as err:
        load_model_config(str(bad))
    assert str(err.value).startswith(f"{bad}: unknown key 'unet.channels'") and "\n" not in str(err.value)
    bad.write_text("base: tiny\nautoencoder:\n  ch_mult: four\n")
    with pytest.raises(UserError, match=r"bad.yaml: key 'autoencoder.ch_mult'"):
        load_model_config(str(bad))
    bad.write_text("base: bad2.yaml\n")
    (tmp_path / "bad2.yaml").write_text(f"base: {bad}\n")
    with pytest.raises(UserError, match="circular 'base:' chain"):
        load_model_config(str(bad))
    bad.write_text("unet: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_model_config(str(bad))
    with pytest.raises(UserError, match=r"stored config\): key 'image_size'"):
        from_dict(VLMDiffConfig, {**STORED_TINY, "image_size": "big"}, "x.ckpt (stored config)")


def test_finetuning_config_goes_through_the_same_loader(tmp_path):
    cfg = load_train_config("autoencoder", ["loss.disc_start=10", "betas=[0.5,0.99]"])
    assert (cfg.loss.disc_start, cfg.betas, cfg.max_steps) == (10, (0.5, 0.99), 60001)
    with pytest.raises(UserError, match="unknown key 'loss.disc_begin'"):
        load_train_config("autoencoder", ["loss.disc_begin=3"])


def test_group_count_must_divide_channels():
    with pytest.raises(UserError, match="norm_groups"):
        UNetModel(dataclasses.replace(UNetConfig(), model_channels=40, norm_groups=32))
    tiny = load_config("tiny", LatentDiffusionConfig, only_own_sections=True)
    with pytest.raises(UserError, match="autoencoder"):
        AutoencoderKL(dataclasses.replace(tiny.autoencoder, ch=24))
    small = dataclasses.replace(tiny.unet, model_channels=16, norm_groups=8, num_heads=2)
    assert UNetModel(small).out[0].num_groups == 8  # the group count comes from the config
