"""The tiny recipe's first stage: the demo data set and a random-start stand-in for Stable Diffusion 1.5.

The tiny recipe runs the real stage scripts on the demo data (``vlmdiff.data.demo``) in seconds. Its
build stage needs a Stable-Diffusion-style checkpoint: this writes one of the demo model config with
random weights (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, schedule
buffers), which build_model.py reads exactly as it reads SD-1.5. Its numbers mean nothing; the recipe
checks that the chain of jobs works.

  python -m vlmdiff.pipeline.demo_assets --data RUN/data --sd_path RUN/models/base_sd.ckpt --classes coffee
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_base_model(path: Path, config: str, seed: int) -> Path:
    """A random-weight latent diffusion model of ``config`` saved as an SD-style checkpoint at ``path``."""
    import torch

    torch.manual_seed(seed)
    model, cfg = _base_model(config)
    return _save_base(model, cfg, path, {"random_start": True, "seed": seed})


def pretrain_base(
    path: Path,
    config: str,
    seed: int,
    ae_ckpt: Path,
    data: Path,
    captions: Path,
    workdir: Path,
    steps: int,
    lr: float,
    batch_size: int,
) -> Path:
    """Pretrain a plain latent diffusion model (the whole UNet) on the demo's normal training images.

    It stands in for Stable Diffusion 1.5 (pretrained on images, with captions) and is written as an
    SD-style checkpoint (see :func:`_save_base`). The autoencoder inside is the finetuned one
    ``ae_ckpt``; ``steps`` 0 leaves the UNet at its random start.
    """
    import lightning.pytorch as pl

    from ldm.checkpoint import load_checkpoint, load_into
    from ldm.models.autoencoder import autoencoder_state_dict

    pl.seed_everything(seed, workers=True, verbose=False)
    model, cfg = _base_model(config, learning_rate=lr)
    load_into(model.first_stage_model, autoencoder_state_dict(load_checkpoint(ae_ckpt), ae_ckpt), str(ae_ckpt))
    if steps > 0:
        _fit(model, data, captions, workdir, steps, batch_size, seed)
    extra = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    return _save_base(model, cfg, path, extra)


def _base_model(config: str, **kwargs: Any) -> tuple[Any, Any]:
    from ldm.config import LatentDiffusionConfig, load_config
    from ldm.models.latent_diffusion import LatentDiffusion

    cfg = load_config(config, LatentDiffusionConfig, only_own_sections=True)
    return LatentDiffusion(cfg, **kwargs), cfg


def _save_base(model: Any, cfg: Any, path: Path, about: dict[str, Any]) -> Path:
    """Save as SD-1.5 is saved (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``,
    schedule buffers, no ``logvar``), so build_model.py reads it exactly as it reads SD-1.5."""
    from ldm.checkpoint import save_checkpoint
    from ldm.config import to_dict

    sd = {k: v for k, v in model.state_dict().items() if k != "logvar"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, sd, config=to_dict(cfg), extra={"demo_base": about})
    log.info("wrote the base model %s", path)
    return path


def _fit(model: Any, data: Path, captions: Path, workdir: Path, steps: int, batch_size: int, seed: int) -> None:
    """``steps`` AdamW steps of the plain eps-prediction loss over the captioned training images."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from vlmdiff.data import build_dataset, load_captions

    caps = load_captions(captions, "train", "mvtec", vlm="template")
    dataset = build_dataset(
        "mvtec", data, "train", image_size=model.cfg.image_size, captions=caps, require_captions=True
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(workdir),
    )
    torch.manual_seed(seed)
    trainer.fit(model, train_dataloaders=loader)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=None, help="the run folder (unused; names the run in the log)")
    p.add_argument("--data", required=True, help="folder of the demo data set (MVTec-AD layout)")
    p.add_argument("--sd_path", required=True, help="where to write the stand-in base model")
    p.add_argument("--classes", nargs="+", default=["coffee"])
    p.add_argument("--n_train", type=int, default=4)
    p.add_argument("--n_test_good", type=int, default=2)
    p.add_argument("--n_test_defect", type=int, default=4)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the data set and of the base model's weights")
    p.add_argument("--config", default="demo", help="model preset of the base model (default demo)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from utils.cli import setup_logging
    from vlmdiff.data.demo import generate_demo_dataset

    args = parse_args(argv)
    setup_logging(args.verbose)
    generate_demo_dataset(
        args.data, args.classes, args.n_train, args.n_test_good, args.n_test_defect, args.image_size, args.seed
    )
    write_base_model(Path(args.sd_path), args.config, args.seed)


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
