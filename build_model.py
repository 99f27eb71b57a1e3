"""Assemble the starting VLMDiff checkpoint from Stable Diffusion 1.5 and a finetuned autoencoder.

Every SG-network weight with a UNet twin starts from SD's UNet, the autoencoder comes from
--ae_path, the text encoder and UNet from --sd_path, and the new layers (hint block, zero
convolutions, SFF) start at their zero/fresh initialisation. Each target weight is filled exactly once
and every shape is checked. The resolved model config is stored in the output.

  python build_model.py --sd_path models/v1-5-pruned.ckpt --ae_path models/mvtec_ae.ckpt \\
      --output models/vlmdiff.ckpt
--sd_path takes a .ckpt, a .safetensors or a Stable Diffusion folder in diffusers layout; half-precision
files (*-fp16, bf16) are cast to float32 (the schedule buffers are then recomputed, not taken rounded).
A trained or assembled VLMDiff checkpoint is refused as --sd_path: it would overwrite the SG network.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from utils.cli import HelpFormatter, add_run_file_args, parse_with_run_file, print_config, run_main, setup_logging
from utils.errors import UserError
from vlmdiff.cli import add_config_args
from vlmdiff.data.registry import canonical_name, dataset_choices

if TYPE_CHECKING:  # the model stack is imported after parsing: --help needs none of it
    import torch

    from vlmdiff.config import VLMDiffConfig

log = logging.getLogger("build_model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--sd_path", default="models/v1-5-pruned.ckpt", help="Stable Diffusion 1.x weights (file or diffusers folder)"
    )
    p.add_argument(
        "--ae_path", default=None, help="finetuned autoencoder checkpoint (default: models/{data_set}_ae.ckpt)"
    )
    p.add_argument(
        "--data_set", default="mvtec", choices=dataset_choices(folder=False), help="names the default --ae_path"
    )
    p.add_argument(
        "--output", default="models/vlmdiff.ckpt", help="where to write the assembled model (.ckpt or .safetensors)"
    )
    p.add_argument(
        "--use_ema", action="store_true", help="take SD's EMA UNet weights (model_ema.*) instead of the raw ones"
    )
    p.add_argument(
        "--unsafe_legacy_pickle",
        action="store_true",
        help="allow arbitrary pickles in the input checkpoints (only for files you trust)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the fresh initialisation of the new layers")
    add_config_args(p)
    add_run_file_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_with_run_file(build_parser(), argv)


def read_sd(path: Path, cfg: VLMDiffConfig, use_ema: bool, unsafe: bool) -> dict[str, torch.Tensor]:
    import torch

    from ldm.checkpoint import drop_ema, load_state_dict, use_ema_weights
    from ldm.diffusion.schedule import SCHEDULE_BUFFERS
    from vlmdiff.checkpoint import CONTROL, UNET, checkpoint_kind

    if path.is_dir():
        from ldm.convert_diffusers import is_diffusers_folder, load_diffusers_folder

        if not is_diffusers_folder(path):
            raise UserError(
                f"--sd_path {path} is a folder but not a diffusers Stable Diffusion folder "
                "(no model_index.json, unet/, vae/)"
            )
        return load_diffusers_folder(path, unet_cfg=cfg.unet, ae_cfg=cfg.autoencoder)
    sd = load_state_dict(path, unsafe)
    if not any(k.startswith(UNET) for k in sd) or any(k.startswith(CONTROL) for k in sd):
        raise UserError(
            f"--sd_path {path} is {checkpoint_kind(sd)}, not Stable Diffusion 1.x: give the SD "
            "checkpoint (e.g. v1-5-pruned.ckpt) as --sd_path; a VLMDiff checkpoint goes to train.py or "
            "test.py --resume_path, an autoencoder to --ae_path"
        )
    sd = use_ema_weights(sd, path=path) if use_ema else drop_ema(sd)
    half = [k for k in SCHEDULE_BUFFERS if k in sd and sd[k].dtype in (torch.float16, torch.bfloat16)]
    if half:
        log.info(
            "%s: the schedule buffers are stored in %s: using freshly computed float32 ones", path, sd[half[0]].dtype
        )
    return {k: v for k, v in sd.items() if k not in half}


def fresh_weights(cfg: VLMDiffConfig, text_from_sd: bool) -> dict[str, torch.Tensor]:
    """Initial values of everything without a pretrained source: new SG layers, schedule, (text)."""
    import torch

    from ldm.diffusion.schedule import register_schedule
    from vlmdiff.sg_network import fresh_new_layers

    fresh = {f"control_model.{k}": v for k, v in fresh_new_layers(cfg.unet, cfg.control).items()}
    holder = torch.nn.Module()
    register_schedule(holder, cfg.diffusion)
    fresh.update(holder.state_dict())
    if not text_from_sd:
        from ldm.modules.text_encoder import build_text_encoder, canonical_clip_names

        enc = build_text_encoder(cfg.text_encoder, load_pretrained=True)
        text = {f"cond_stage_model.{k}": v for k, v in enc.state_dict().items()}
        fresh.update(canonical_clip_names(text) if cfg.text_encoder.kind == "clip" else text)
    return fresh


def build(args: argparse.Namespace) -> Path:
    import torch

    from ldm.checkpoint import cast_to_model_dtypes, load_checkpoint, save_checkpoint
    from ldm.config import to_dict
    from ldm.models.autoencoder import autoencoder_state_dict
    from utils.provenance import provenance
    from vlmdiff.checkpoint import assemble_state_dict
    from vlmdiff.config import load_model_config
    from vlmdiff.model import VLMDiff

    cfg = load_model_config(args.config, args.overrides)
    sd_path = Path(args.sd_path)
    ae_path = Path(args.ae_path or f"models/{canonical_name(args.data_set)}_ae.ckpt")
    output = Path(args.output)
    if output.suffix not in (".ckpt", ".safetensors"):
        raise UserError(f"--output {output} must end in .ckpt or .safetensors")
    for flag, p in (("--sd_path", sd_path), ("--ae_path", ae_path)):
        if not p.exists():
            raise UserError(f"{flag} {p} does not exist (see models/README.md for where to get it)")
    torch.manual_seed(args.seed)
    text_from_sd = cfg.text_encoder.kind == "clip" and cfg.text_encoder.pretrained is None
    log.info("reading %s", sd_path)
    sd = read_sd(sd_path, cfg, args.use_ema, args.unsafe_legacy_pickle)
    log.info("reading %s", ae_path)
    ae = autoencoder_state_dict(load_checkpoint(ae_path, args.unsafe_legacy_pickle), ae_path)
    with torch.device("meta"):
        meta = VLMDiff(cfg, load_pretrained_text=False).state_dict()
    target = {k: v.shape for k, v in meta.items()}
    state, sources = assemble_state_dict(
        target,
        fresh_weights(cfg, text_from_sd),
        sd,
        ae,
        text_from_sd=text_from_sd,
        sd_path=str(sd_path),
        ae_path=str(ae_path),
    )
    del sd, ae
    state = cast_to_model_dtypes(state, {k: v.dtype for k, v in meta.items()}, "the assembled weights")
    log.info("assembled %d tensors: %s", len(state), sources)
    info = provenance(
        seed=args.seed,
        config=to_dict(cfg),
        sd_path=str(sd_path),
        ae_path=str(ae_path),
        use_ema=args.use_ema,
        sources=sources.counts,
    )
    save_checkpoint(output, state, config=to_dict(cfg), extra={"provenance": info})
    log.info("wrote %s", output)
    return output


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = parse_args(argv)
    if args.print_config:
        from ldm.config import to_dict
        from vlmdiff.config import load_model_config

        print_config(args, model=to_dict(load_model_config(args.config, args.overrides)))
        return None
    setup_logging(args.verbose)
    return build(args)


if __name__ == "__main__":
    sys.exit(run_main(main))
