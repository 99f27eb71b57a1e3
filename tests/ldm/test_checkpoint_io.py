"""Checkpoints in the real formats load strictly; bad files give one clear error naming the key/file."""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import (
    OpaqueObject,
    drop_ema,
    ema_key,
    load_checkpoint,
    load_into,
    load_state_dict,
    save_checkpoint,
    use_ema_weights,
)
from ldm.config import LatentDiffusionConfig, load_config, to_dict
from ldm.models.latent_diffusion import LatentDiffusion
from utils.errors import UserError


@pytest.fixture(scope="module")
def tiny_model() -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(load_config("tiny", LatentDiffusionConfig, only_own_sections=True))


def _sd_style(model: LatentDiffusion) -> dict[str, torch.Tensor]:
    """Our state dict as an SD-1.5 checkpoint holds it: old CLIP names, position_ids, EMA copies."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in sd
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd[ema_key(k)] = sd[k] + 1.0  # distinguishable EMA weights
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    return sd


def test_sd_pickle_with_ema_loads_strictly(tmp_path, tiny_model):
    sd = _sd_style(tiny_model)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, path)
    loaded = load_state_dict(path)
    assert any(k.startswith("model_ema.") for k in loaded)
    fresh = LatentDiffusion(tiny_model.cfg)
    load_into(fresh, drop_ema(loaded), path)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(fresh.state_dict()[key], sd[key])
    load_into(fresh, use_ema_weights(loaded, path=path), path)
    assert torch.equal(fresh.state_dict()[key], sd[key] + 1.0)
    clip_key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(fresh.state_dict()[clip_key], sd[clip_key])


def test_installed_transformers_names_also_load(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    new_names = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue  # newer transformers releases do not save it
        new_names[k.replace("transformer.text_model.", "transformer.")] = v
    fresh = LatentDiffusion(tiny_model.cfg)
    fresh.load_weights(new_names, "new-names")
    k = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert torch.equal(fresh.state_dict()[k], sd[k])


def test_lightning1_pickle_loads_without_running_code(tmp_path, tiny_model):
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = {
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": "1.5.0",
        "state_dict": tiny_model.state_dict(),
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "dirpath": "/x"}},
        "hyper_parameters": {"config": OmegaConf.create({"model": {"lr": 1e-5}})},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}],
    }
    path = tmp_path / "pl1.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses it
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert loaded["global_step"] == 1234
    assert list(loaded["callbacks"]) == [OpaqueObject]  # the class key stands in for ModelCheckpoint
    assert isinstance(loaded["hyper_parameters"]["config"], OpaqueObject)
    fresh = LatentDiffusion(tiny_model.cfg)
    load_into(fresh, loaded["state_dict"], path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, path)
    with pytest.raises(UserError, match="--unsafe_legacy_pickle"):
        load_checkpoint(path)


def test_safetensors_roundtrip_with_config(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model.state_dict(), config=to_dict(tiny_model.cfg))
    loaded = load_checkpoint(path)
    assert loaded["config"] == to_dict(tiny_model.cfg)
    fresh = LatentDiffusion(tiny_model.cfg)
    load_into(fresh, loaded["state_dict"], path)
    k = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(fresh.state_dict()[k], tiny_model.state_dict()[k])


def test_ckpt_roundtrip_with_config(tmp_path, tiny_model):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, tiny_model.state_dict(), config=to_dict(tiny_model.cfg))
    assert load_checkpoint(path)["config"]["unet"]["model_channels"] == tiny_model.cfg.unet.model_channels


@pytest.mark.parametrize("damage", ["missing", "shape", "nan"])
def test_damaged_state_dict_names_the_key(tmp_path, tiny_model, damage):
    sd = dict(tiny_model.state_dict())
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    if damage == "missing":
        del sd[key]
    elif damage == "shape":
        sd[key] = torch.zeros(3, 3)
    else:
        sd[key] = torch.full_like(sd[key], float("nan"))
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": sd}, path)
    fresh = LatentDiffusion(tiny_model.cfg)
    with pytest.raises(UserError) as err:
        load_into(fresh, load_state_dict(path), path)
    msg = str(err.value)
    assert key in msg and str(path) in msg and "\n" not in msg


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(text)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="cut.ckpt"):
        load_checkpoint(cut)
    st = tmp_path / "cut.safetensors"
    st.write_bytes(b"\x00" * 10)
    with pytest.raises(UserError, match="safetensors"):
        load_checkpoint(st)
    with pytest.raises(UserError, match="no tensors"):
        torch.save({"state_dict": {"a": 1}}, tmp_path / "empty.ckpt")
        load_state_dict(tmp_path / "empty.ckpt")


def test_ema_requested_but_absent(tiny_model):
    with pytest.raises(UserError, match="EMA"):
        use_ema_weights(tiny_model.state_dict(), path="plain.ckpt")
