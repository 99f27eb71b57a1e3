"""The SD-1.5-size latent diffusion model has upstream's weight names and shapes (built on meta)."""

from __future__ import annotations

import json

import torch

from ldm.config import LatentDiffusionConfig, load_config
from ldm.models.latent_diffusion import LatentDiffusion

SCHEDULE = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
}


def test_sd15_names_and_shapes_match_upstream(fixtures_dir):
    ref = json.loads((fixtures_dir / "sd15_vlmdiff_keys.json").read_text())
    ref = {k: tuple(v) for k, v in ref.items() if not k.startswith("control_model.")}
    cfg = load_config("sd15", LatentDiffusionConfig, only_own_sections=True)
    with torch.device("meta"):
        model = LatentDiffusion(cfg, load_pretrained_text=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ours[k] != ref[k]} == {}
    assert SCHEDULE <= set(ours)
    sd = model.state_dict()
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    n_unet = sum(p.numel() for p in model.model.parameters())
    assert n_unet == 859_520_964
    assert sum(p.numel() for p in model.first_stage_model.parameters()) == 83_653_863
    assert sum(p.numel() for p in model.cond_stage_model.parameters()) == 123_060_557 - 77  # position_ids is a buffer
