"""Stable Diffusion folders in diffusers layout convert to our names and compute the same outputs.

Tiny diffusers / transformers models with random weights are saved with ``save_pretrained`` (no
download), converted, loaded strictly into our modules and run side by side. SD-1.5-size names are
checked on the meta device against the upstream key fixture.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

from ldm.checkpoint import load_into
from ldm.config import AutoencoderConfig, CLIPTextArch, LatentDiffusionConfig, UNetConfig, load_config
from ldm.convert_diffusers import check_unet_folder_config, is_diffusers_folder, load_diffusers_folder
from ldm.diffusers_names import (
    AE_PREFIX,
    CLIP_PREFIX,
    UNET_PREFIX,
    convert_clip_state_dict,
    convert_unet_state_dict,
    convert_vae_state_dict,
)
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.text_encoder import TextEncoder
from ldm.modules.unet import UNetModel, attention_heads
from utils.errors import UserError

diffusers = pytest.importorskip("diffusers")
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

TOL = 1e-5


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    """The diffusers UNet2DConditionModel arguments of the SD-1 UNet ``cfg`` describes."""
    levels = range(len(cfg.channel_mult))
    attn = [2**lvl in cfg.attention_resolutions for lvl in levels]
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=cfg.context_dim,
        # SD-1 configs of diffusers call the number of heads attention_head_dim
        attention_head_dim=attention_heads(cfg, cfg.model_channels * cfg.channel_mult[0])[0],
        norm_num_groups=cfg.norm_groups,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def diffusers_vae_kwargs(cfg: AutoencoderConfig) -> dict:
    return dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
    )


def clip_config(a: CLIPTextArch) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        max_position_embeddings=a.max_position_embeddings,
        hidden_act=a.hidden_act,
        layer_norm_eps=a.layer_norm_eps,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norms included), so a swapped name cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def tiny_cfg() -> LatentDiffusionConfig:
    return load_config("tiny", LatentDiffusionConfig, only_own_sections=True)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_cfg):
    """A diffusers-layout folder of tiny random models; returns (folder, unet, vae, clip)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd_diffusers")
    unet = perturb(diffusers.UNet2DConditionModel(sample_size=16, **diffusers_unet_kwargs(tiny_cfg.unet)), 1)
    vae = perturb(diffusers.AutoencoderKL(sample_size=32, **diffusers_vae_kwargs(tiny_cfg.autoencoder)), 2)
    clip = perturb(CLIPTextModel(clip_config(tiny_cfg.text_encoder.clip_arch)), 3)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
            }
        )
    )
    return folder, unet, vae, clip


@pytest.fixture(scope="module")
def converted(tiny_folder, tiny_cfg) -> dict[str, torch.Tensor]:
    return load_diffusers_folder(tiny_folder[0], unet_cfg=tiny_cfg.unet, ae_cfg=tiny_cfg.autoencoder)


def part(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def test_detects_diffusers_folder(tiny_folder, tmp_path):
    assert is_diffusers_folder(tiny_folder[0])
    assert not is_diffusers_folder(tmp_path)
    assert not is_diffusers_folder(tiny_folder[0] / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    assert is_diffusers_folder(tmp_path)  # no model_index.json, but the two subfolders


def test_unet_forward_equals_diffusers(tiny_folder, tiny_cfg, converted):
    _, ref_unet, _, _ = tiny_folder
    ours = UNetModel(tiny_cfg.unet).eval()
    load_into(ours, part(converted, UNET_PREFIX), "converted unet")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([7, 913])
    context = torch.randn(2, 5, tiny_cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        want = ref_unet(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert want.abs().max() > 0.1  # a non-trivial output
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_autoencoder_equals_diffusers(tiny_folder, tiny_cfg, converted):
    _, _, ref_vae, _ = tiny_folder
    ours = AutoencoderKL(tiny_cfg.autoencoder).eval()
    load_into(ours, part(converted, AE_PREFIX), "converted vae")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 32, generator=g)
    z = torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        posterior = ref_vae.encode(x).latent_dist
        torch.testing.assert_close(ours.encode(x).mean, posterior.mean, atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.encode(x).logvar, posterior.logvar, atol=TOL, rtol=TOL)
        torch.testing.assert_close(ours.decode(z), ref_vae.decode(z).sample, atol=TOL, rtol=TOL)


def test_text_encoder_equals_transformers(tiny_folder, tiny_cfg, converted):
    _, _, _, ref_clip = tiny_folder
    te = TextEncoder(CLIPTextModel(clip_config(tiny_cfg.text_encoder.clip_arch)), None, 77, "clip")
    clip_sd = part(converted, CLIP_PREFIX)
    assert "transformer.text_model.embeddings.position_ids" in clip_sd
    load_into(te, clip_sd, "converted text encoder")
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(
            te.transformer(input_ids=ids).last_hidden_state,
            ref_clip(input_ids=ids).last_hidden_state,
            atol=TOL,
            rtol=TOL,
        )


def test_converted_dict_is_float32_and_complete(converted, tiny_cfg):
    with torch.device("meta"):
        n_unet = len(UNetModel(tiny_cfg.unet).state_dict())
        n_ae = len(AutoencoderKL(tiny_cfg.autoencoder).state_dict())
    assert len(part(converted, UNET_PREFIX)) == n_unet
    assert len(part(converted, AE_PREFIX)) == n_ae
    assert all(v.dtype == torch.float32 for k, v in converted.items() if not k.endswith("position_ids"))


def test_fp16_variant_and_bin_files(tiny_folder, tiny_cfg, converted, tmp_path):
    folder, unet, vae, _ = tiny_folder
    other = tmp_path / "fp16"
    other.mkdir()
    shutil.copy(folder / "model_index.json", other)
    copy.deepcopy(unet).half().save_pretrained(other / "unet", variant="fp16")
    vae.save_pretrained(other / "vae", safe_serialization=False)
    shutil.copytree(folder / "text_encoder", other / "text_encoder")
    assert (other / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (other / "vae" / "diffusion_pytorch_model.bin").is_file()
    # without a variant, the fp16 file is the fallback where no full-precision one exists
    sd = load_diffusers_folder(other, unet_cfg=tiny_cfg.unet, ae_cfg=tiny_cfg.autoencoder)
    assert sd.keys() == converted.keys()
    for k, v in sd.items():
        assert v.dtype == converted[k].dtype, k
        want = converted[k].half().float() if k.startswith(UNET_PREFIX) else converted[k]  # rounded to fp16 and back
        assert torch.equal(v, want), k
    # an explicit variant is required of every component
    with pytest.raises(
        UserError, match=r"vae: no weight file; expected one of diffusion_pytorch_model.fp16.safetensors"
    ):
        load_diffusers_folder(other, unet_cfg=tiny_cfg.unet, ae_cfg=tiny_cfg.autoencoder, variant="fp16")


def test_sd15_names_and_shapes_match_upstream(fixtures_dir):
    """diffusers' SD-1.5 architecture (built on meta) converts to exactly upstream's names and shapes."""
    cfg = load_config("sd15", LatentDiffusionConfig, only_own_sections=True)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(sample_size=64, **diffusers_unet_kwargs(cfg.unet))
        vae = diffusers.AutoencoderKL(sample_size=512, **diffusers_vae_kwargs(cfg.autoencoder))
        clip = CLIPTextModel(clip_config(cfg.text_encoder.clip_arch))
    assert unet.config.block_out_channels == (320, 640, 1280, 1280) and unet.config.attention_head_dim == 8
    assert vae.config.block_out_channels == (128, 256, 512, 512)
    clip_sd = clip.state_dict()
    ours = {}
    ours.update(convert_unet_state_dict(unet.state_dict(), cfg.unet))
    ours.update(convert_vae_state_dict(vae.state_dict(), cfg.autoencoder))
    ours.update(convert_clip_state_dict(clip_sd, context_dim=768, reference={k: v.shape for k, v in clip_sd.items()}))
    ref = json.loads((fixtures_dir / "sd15_vlmdiff_keys.json").read_text())
    ref = {k: tuple(v) for k, v in ref.items() if k.startswith((UNET_PREFIX, AE_PREFIX, CLIP_PREFIX))}
    got = {k: tuple(v.shape) for k, v in ours.items()}
    assert sorted(set(ref) - set(got)) == []
    assert sorted(set(got) - set(ref)) == []
    assert {k: (got[k], ref[k]) for k in ref if got[k] != ref[k]} == {}
    assert sum(k.startswith(UNET_PREFIX) for k in got) == 686  # every diffusers UNet tensor used once


def test_older_vae_attention_names(tiny_folder, tiny_cfg, converted):
    """Pre-0.14 diffusers named the VAE attention query/key/value/proj_attn."""
    _, _, vae, _ = tiny_folder
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in vae.state_dict().items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        sd[k] = v
    got = convert_vae_state_dict(sd, tiny_cfg.autoencoder)
    assert all(torch.equal(v, converted[k]) for k, v in got.items())


def test_missing_vae_folder_is_one_clear_error(tiny_folder, tiny_cfg, tmp_path):
    folder = tmp_path / "incomplete"
    shutil.copytree(tiny_folder[0], folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(UserError, match=rf"{folder}: no vae/ folder"):
        load_diffusers_folder(folder, unet_cfg=tiny_cfg.unet, ae_cfg=tiny_cfg.autoencoder)


def test_foreign_weight_file_is_one_clear_error(tiny_folder, tiny_cfg, tmp_path):
    folder = tmp_path / "foreign"
    shutil.copytree(tiny_folder[0], folder)
    # the VAE's weights where the UNet's belong
    shutil.copy(
        folder / "vae" / "diffusion_pytorch_model.safetensors", folder / "unet" / "diffusion_pytorch_model.safetensors"
    )
    with pytest.raises(UserError) as err:
        load_diffusers_folder(folder, unet_cfg=tiny_cfg.unet, ae_cfg=tiny_cfg.autoencoder)
    msg = str(err.value)
    assert str(folder / "unet") in msg
    assert "'decoder.conv_in.bias'" in msg  # the first unconverted key
    assert "our UNet (model_channels 32" in msg and "missing" in msg


def test_wrong_structure_and_garbage_file(tiny_folder, tiny_cfg, tmp_path):
    folder = tmp_path / "garbage"
    shutil.copytree(tiny_folder[0], folder)
    sd15 = load_config("sd15", LatentDiffusionConfig, only_own_sections=True)
    with pytest.raises(UserError, match=r"unet.*cannot convert.*another shape"):
        load_diffusers_folder(
            folder, unet_cfg=replace(sd15.unet, num_heads=4, context_dim=24), ae_cfg=tiny_cfg.autoencoder
        )
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"text_encoder/model.safetensors is not a readable"):
        load_diffusers_folder(folder, unet_cfg=tiny_cfg.unet, ae_cfg=tiny_cfg.autoencoder)


def test_unet_config_that_computes_differently_is_rejected(tiny_cfg):
    good = dict(diffusers_unet_kwargs(tiny_cfg.unet))
    check_unet_folder_config(good, tiny_cfg.unet)
    with pytest.raises(UserError, match="flip_sin_to_cos"):
        check_unet_folder_config({**good, "flip_sin_to_cos": False}, tiny_cfg.unet)
    with pytest.raises(UserError, match=r"8 attention heads at level 0.*unet.num_heads=8"):
        check_unet_folder_config({**good, "attention_head_dim": 8}, tiny_cfg.unet)
    check_unet_folder_config({**good, "attention_head_dim": [4, 4, 4, 4]}, tiny_cfg.unet)
