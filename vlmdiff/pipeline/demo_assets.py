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

log = logging.getLogger(__name__)


def write_base_model(path: Path, config: str, seed: int) -> Path:
    """A random-weight latent diffusion model of ``config`` saved as an SD-style checkpoint at ``path``."""
    import torch

    from ldm.checkpoint import save_checkpoint
    from ldm.config import LatentDiffusionConfig, load_config, to_dict
    from ldm.models.latent_diffusion import LatentDiffusion

    torch.manual_seed(seed)
    cfg = load_config(config, LatentDiffusionConfig, only_own_sections=True)
    model = LatentDiffusion(cfg)
    sd = {k: v for k, v in model.state_dict().items() if k != "logvar"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, sd, config=to_dict(cfg), extra={"demo_base": {"random_start": True, "seed": seed}})
    log.info("wrote the random-start base model %s", path)
    return path


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
