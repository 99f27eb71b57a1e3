"""Tiny checkpoints in the real on-disk formats, for tests of build_model, train and test.

* an SD-1.5-style pickle: ``state_dict`` with ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.text_model.*`` (+ position_ids), 12 schedule buffers (no logvar)
  and ``model_ema.*`` copies;
* a Lightning-1.x-style first-stage checkpoint: ``encoder.*`` ... plus ``loss.*`` keys, optimiser
  states and Lightning objects pickled beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint import ema_key
from ldm.config import LatentDiffusionConfig, load_config
from ldm.models.latent_diffusion import LatentDiffusion


def tiny_ldm(config: str = "tiny", seed: int = 0, overrides: tuple[str, ...] = ()) -> LatentDiffusion:
    torch.manual_seed(seed)
    return LatentDiffusion(load_config(config, LatentDiffusionConfig, overrides, only_own_sections=True))


def write_sd_checkpoint(
    path: Path, config: str = "tiny", seed: int = 0, ema: bool = True, overrides: tuple[str, ...] = ()
) -> Path:
    model = tiny_ldm(config, seed, overrides)
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "logvar"}
    if ema:
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            sd[ema_key(k)] = sd[k] * 0.5
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1, dtype=torch.int32)
    torch.save({"state_dict": sd, "global_step": 840000, "epoch": 0}, path)
    return path


def write_ae_checkpoint(path: Path, config: str = "tiny", seed: int = 1, overrides: tuple[str, ...] = ()) -> Path:
    from pytorch_lightning.callbacks import ModelCheckpoint

    model = tiny_ldm(config, seed, overrides)
    sd = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    torch.save(
        {
            "epoch": 3,
            "global_step": 1000,
            "pytorch-lightning_version": "1.5.0",
            "state_dict": sd,
            "callbacks": {ModelCheckpoint: {"best_model_score": None}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-5}]}],
        },
        path,
    )
    return path


def build_tiny_vlmdiff(tmp: Path, config: str = "tiny", overrides: tuple[str, ...] = ()) -> Path:
    """An assembled tiny VLMDiff checkpoint made by build_model.py from tiny SD + AE files."""
    import build_model

    sd = write_sd_checkpoint(tmp / "sd.ckpt", config, overrides=overrides)
    ae = write_ae_checkpoint(tmp / "ae.ckpt", config, overrides=overrides)
    out = tmp / "vlmdiff.ckpt"
    build_model.main(["--sd_path", str(sd), "--ae_path", str(ae), "--output", str(out), "--config", config, *overrides])
    return out


def demo_data_and_model(
    tmp: Path, *, n_train: int, n_test_good: int, n_test_defect: int, seed: int = 0
) -> tuple[Path, Path, Path]:
    """``(tmp, data, checkpoint)``: a two-class demo dataset (brick, coffee) at 128 px and a tiny assembled VLMDiff."""
    from vlmdiff.data.demo import generate_demo_dataset

    data = generate_demo_dataset(
        tmp / "data",
        classes=("brick", "coffee"),
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defect=n_test_defect,
        image_size=128,
        seed=seed,
    )
    return tmp, data, build_tiny_vlmdiff(tmp)
