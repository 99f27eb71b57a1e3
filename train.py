"""Train VLMDiff on the normal images of one dataset (all classes together).

Starts from an assembled checkpoint (build_model.py) or continues an interrupted run. Trainable: the
SG network, the UNet output blocks and its final layer; AdamW (lr 1e-5, weight decay 0.01), batch 12,
gradient accumulation 4, seed 1 -- the paper's settings. Checkpoints, TensorBoard and CSV logs go to
{output_root}/ckpt_{exp_name}/.

  python train.py --data_set mvtec --data_path data/mvtec --resume_path models/vlmdiff.ckpt
  python train.py ... --use_captions --caption_folder data/mvtec_captions_internvl_pd
  python train.py ... --resume                      # continue after a crash or preemption
  python train.py ... --devices 4 --strategy ddp    # several GPUs (see README for nodes/SLURM)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl

from ldm.config import to_dict
from utils.cli import data_workers, run_main, setup_logging
from utils.errors import UserError
from utils.progress import add_progress_args
from utils.provenance import provenance
from vlmdiff.checkpoint import load_vlmdiff
from vlmdiff.cli import PAPER_EPOCHS, add_caption_args, add_config_args, add_data_args, canonical_dataset, coco_part, load_split_captions
from vlmdiff.training import PRECISIONS, PerRankSeed, SaveProvenance, checkpoint_callback, last_checkpoint, make_trainer, train_loader

log = logging.getLogger("train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_caption_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--resume_path", default=None, help="starting weights: an assembled or trained VLMDiff checkpoint")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in ckpt_{exp_name}/ from last.ckpt (weights, optimiser, epoch, step)")
    g.add_argument("--exp_name", default=None, help="run name (default: vlmdiff_{data_set}); checkpoints in ckpt_{exp_name}/")
    g.add_argument("--output_root", default=".", help="folder that holds ckpt_{exp_name}/")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--unsafe_legacy_pickle", action="store_true", help="allow arbitrary pickles in --resume_path (trusted files only)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max_epochs", type=int, default=None, help="default: the paper's (300 MVTec-AD/VisA, 100 Real-IAD/COCO-AD)")
    o.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimiser steps (-1: no limit)")
    o.add_argument("--batch_size", type=int, default=12, help="images per device and step")
    o.add_argument("--lr", type=float, default=1e-5)
    o.add_argument("--weight_decay", type=float, default=0.01)
    o.add_argument("--accumulate_grad_batches", type=int, default=4)
    o.add_argument("--fused_adamw", action="store_true", help="fused AdamW kernel (GPU)")
    o.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, ~30%% slower)")
    h = p.add_argument_group("hardware")
    h.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    h.add_argument("--devices", default="auto", help="number of devices, a list, or auto")
    h.add_argument("--num_nodes", type=int, default=1)
    h.add_argument("--strategy", default="auto", help="auto, ddp, ddp_find_unused_parameters_true, ...")
    h.add_argument("--precision", default="32", choices=PRECISIONS, help="32 is faithful; bf16-mixed is recommended on GPUs that have it")
    h.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers (default: 4, at most the CPUs available)")
    s = p.add_argument_group("saving and logging")
    s.add_argument("--save_every_n_epochs", type=int, default=10)
    s.add_argument("--save_every_n_steps", type=int, default=None, help="save by optimiser steps instead of epochs")
    s.add_argument("--log_every_n_steps", type=int, default=10)
    s.add_argument("--no_progress_bar", action="store_true", help="plain progress lines instead of the bar")
    add_progress_args(s)
    add_config_args(p, default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.devices = _devices(args.devices)
    return args


def _devices(value: str) -> int | str | list[int]:
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--devices must be a number, a comma list or auto, got {value!r}") from None


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging(args.verbose)
    dataset = canonical_dataset(args.data_set)
    if dataset == "coco" and args.coco_part < 0:
        raise UserError("--data_set coco needs --coco_part 0..3")
    args.max_epochs = args.max_epochs if args.max_epochs is not None else PAPER_EPOCHS[dataset]
    exp = args.exp_name or f"vlmdiff_{dataset}"
    ckpt_dir = Path(args.output_root) / f"ckpt_{exp}"
    resume_from = last_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume_from is None and args.resume_path is None:
        raise UserError(f"--resume: no {ckpt_dir / 'last.ckpt'} to continue from, and no --resume_path to start from")
    if resume_from is None and args.resume_path is None:
        raise UserError("give --resume_path (an assembled checkpoint from build_model.py) or --resume")
    if resume_from is None and (ckpt_dir / "last.ckpt").exists():
        raise UserError(f"{ckpt_dir} already holds a run: pass --resume to continue it or choose another --exp_name")
    start = resume_from or Path(args.resume_path)
    overrides = list(args.overrides) + (["unet.use_checkpoint=true"] if args.gradient_checkpointing else [])
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model, _ = load_vlmdiff(start, args.config, overrides, args.unsafe_legacy_pickle, learning_rate=args.lr,
                            weight_decay=args.weight_decay, fused_optimizer=args.fused_adamw)
    from vlmdiff.data import build_dataset

    data = build_dataset(dataset, args.data_path, "train", classes=args.classes, image_size=model.cfg.image_size,
                         captions=load_split_captions(args, "train"), require_captions=args.use_captions,
                         coco_part=coco_part(args))
    loader = train_loader(data, args.batch_size, data_workers(args.num_workers, 4), args.seed)
    info = provenance(seed=args.seed, config=to_dict(model.cfg), start_weights=str(start), data_set=dataset,
                      data_path=str(args.data_path), use_captions=args.use_captions)
    callbacks = [checkpoint_callback(ckpt_dir, args.save_every_n_epochs, args.save_every_n_steps),
                 PerRankSeed(args.seed), SaveProvenance(info)]
    trainer = make_trainer(args, ckpt_dir, callbacks)
    log.info("training %d images of %d classes; %s", len(data), len(data.class_names),
             f"resuming {resume_from}" if resume_from else f"from {start}")
    trainer.fit(model, train_dataloaders=loader, ckpt_path=str(resume_from) if resume_from else None)
    if trainer.is_global_zero:
        kept = sorted(p.name for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
        log.info("done after %d steps (epoch %d): %s (--resume continues from it), %d periodic checkpoint(s)%s in %s; "
                 "logs %s and TensorBoard events beside it", trainer.global_step, trainer.current_epoch,
                 ckpt_dir / "last.ckpt", len(kept), f" up to {kept[-1]}" if kept else "", ckpt_dir,
                 ckpt_dir / "logs" / "metrics.csv")
    return ckpt_dir


if __name__ == "__main__":
    sys.exit(run_main(main))
