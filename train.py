"""Train VLMDiff on the normal images of one dataset (all classes together).

Starts from an assembled checkpoint (build_model.py) or continues an interrupted run. Trainable: the
SG network, the UNet output blocks and its final layer; AdamW (lr 1e-5, weight decay 0.01), batch 12,
gradient accumulation 4, seed 1 -- the paper's settings, read from the recipe configs/train.yaml (the flags
of the same names override it). Checkpoints, TensorBoard and CSV logs go to
{output_root}/ckpt_{exp_name}/: model_epoch=NNN.ckpt every 25 epochs (20 for Real-IAD and COCO-AD; NNN is
the 0-based epoch, so the 100th epoch is model_epoch=099.ckpt) and last.ckpt. A relative --caption_folder
that does not exist in the working folder is looked up beside the dataset root ({data_path}/..).

  python train.py --data_set mvtec --data_path data/mvtec --resume_path models/vlmdiff.ckpt
  python train.py ... --use_captions --caption_folder mvtec_captions_internvl_pd   # found in data/
  python train.py ... --keep_last_n 2              # only the two newest model_epoch=NNN.ckpt stay on disk
  python train.py ... --resume                      # continue after a crash or preemption

SIGTERM (SLURM preemption or time limit) saves ckpt_{exp_name}/last.ckpt and exits with code 143; a
non-finite loss stops the run with an error naming the step, and no checkpoint is ever written with
NaN/inf weights.
  python train.py ... --devices 4 --strategy ddp    # several GPUs (see README for nodes/SLURM)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.cli import (
    HelpFormatter,
    add_run_file_args,
    data_workers,
    parse_with_run_file,
    print_config,
    run_main,
    setup_logging,
)
from utils.errors import UserError
from utils.lock import claim_folder
from utils.progress import add_progress_args
from vlmdiff.cli import (
    PRECISIONS,
    TRAIN_RECIPE,
    add_caption_args,
    add_config_args,
    add_data_args,
    check_numbers,
    coco_part,
    lightning_precision,
    load_split_captions,
    load_train_recipe,
    model_config_to_print,
    parse_devices,
)
from vlmdiff.data.registry import canonical_name

log = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    recipe = load_train_recipe()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(p)
    add_caption_args(p)
    g = p.add_argument_group("run")
    g.add_argument(
        "--resume_path",
        default=None,
        help="starting weights: an assembled or trained VLMDiff checkpoint (default: none; needed unless --resume)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in ckpt_{exp_name}/ from last.ckpt (weights, optimiser, epoch, step)",
    )
    g.add_argument(
        "--exp_name", default=None, help="run name (default: vlmdiff_{data_set}); checkpoints in ckpt_{exp_name}/"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a ckpt_{exp_name}/ that holds another run's checkpoints, removing them first "
        "(default: refused)",
    )
    g.add_argument("--output_root", default=".", help="folder that holds ckpt_{exp_name}/")
    g.add_argument("--seed", type=int, default=recipe.seed, help="global seed; each rank derives its own from it")
    g.add_argument(
        "--unsafe_legacy_pickle",
        action="store_true",
        help="allow arbitrary pickles in --resume_path (trusted files only)",
    )
    o = p.add_argument_group(f"optimisation (defaults: the recipe in configs/{TRAIN_RECIPE}.yaml)")
    o.add_argument(
        "--max_epochs",
        type=int,
        default=None,
        help=f"epochs (default: the recipe's per dataset, the paper's: {_per_dataset(recipe.max_epochs)})",
    )
    o.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimiser steps (-1: no limit)")
    o.add_argument("--batch_size", type=int, default=recipe.batch_size, help="images per device and step")
    o.add_argument("--lr", type=float, default=recipe.lr, help="AdamW learning rate")
    o.add_argument("--weight_decay", type=float, default=recipe.weight_decay, help="AdamW weight decay")
    o.add_argument(
        "--accumulate_grad_batches",
        type=int,
        default=recipe.accumulate_grad_batches,
        help="batches per optimiser step",
    )
    o.add_argument("--fused_adamw", action="store_true", help="fused AdamW kernel (GPU)")
    o.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, ~30%% slower)",
    )
    h = p.add_argument_group("hardware")
    h.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    h.add_argument(
        "--devices",
        default="auto",
        type=parse_devices,
        help="number of devices (-1: all), a comma list of indices like 0,1, or auto",
    )
    h.add_argument("--num_nodes", type=int, default=1, help="machines taking part")
    h.add_argument("--strategy", default="auto", help="auto, ddp, ddp_find_unused_parameters_true, ...")
    h.add_argument(
        "--precision",
        default="32",
        type=lightning_precision,
        choices=PRECISIONS,
        help="32 is faithful; bf16-mixed is recommended on GPUs that have it (bf16 and 16 are accepted "
        "for bf16-mixed and 16-mixed)",
    )
    h.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader workers per device (default: 4, at most the CPUs available)",
    )
    s = p.add_argument_group("saving and logging")
    s.add_argument(
        "--save_every_n_epochs",
        type=int,
        default=None,
        help="write model_epoch=NNN.ckpt every this many epochs (default: the recipe's per dataset, "
        f"upstream's: {_per_dataset(recipe.save_every_n_epochs)})",
    )
    s.add_argument(
        "--save_every_n_steps",
        type=int,
        default=None,
        help="save by optimiser steps instead of epochs, as step=NNNNNNN.ckpt (default: by epochs)",
    )
    s.add_argument(
        "--keep_last_n",
        type=int,
        default=None,
        help="keep only the N newest periodic checkpoints; last.ckpt stays (default: all, as upstream)",
    )
    s.add_argument("--log_every_n_steps", type=int, default=10, help="optimiser steps between logged rows")
    add_progress_args(s)
    add_config_args(p, default=None)
    add_run_file_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _per_dataset(values: dict[str, int]) -> str:
    return ", ".join(f"{dataset} {value}" for dataset, value in values.items())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags as given; :func:`resolve_defaults` fills in what depends on the dataset."""
    return parse_with_run_file(build_parser(), argv)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the flags left to their dataset's default (run name, epochs, checkpoint period) in place."""
    dataset = canonical_name(args.data_set)
    recipe = load_train_recipe()
    args.exp_name = args.exp_name or f"vlmdiff_{dataset}"
    if args.max_epochs is None:
        args.max_epochs = recipe.for_dataset("max_epochs", dataset)
    if args.save_every_n_epochs is None and args.save_every_n_steps is None:
        args.save_every_n_epochs = recipe.for_dataset("save_every_n_epochs", dataset)
    return args


def main(argv: Sequence[str] | None = None) -> Path | None:
    args = resolve_defaults(parse_args(argv))
    if args.print_config:
        print_config(args, model=model_config_to_print(args, args.resume_path))
        return None
    setup_logging(args.verbose)
    _check_args(args)
    from lightning.pytorch.utilities import rank_zero_only

    first_process = rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"  # of a DDP job
    with claim_folder(_ckpt_dir(args), "train.py", "--exp_name or --output_root", holder=first_process):
        return run(args)


def _check_args(args: argparse.Namespace) -> None:
    """Flags that can be checked before any work."""
    if canonical_name(args.data_set) == "coco" and args.coco_part < 0:
        raise UserError("--data_set coco needs --coco_part 0..3")
    check_numbers(
        args,
        {
            "batch_size": ">= 1",
            "accumulate_grad_batches": ">= 1",
            "lr": "> 0",
            "weight_decay": ">= 0",
            "num_nodes": ">= 1",
            "num_workers": ">= 0",
            "max_epochs": ">= 0 or -1",
            "max_steps": ">= 1 or -1",
            "save_every_n_epochs": ">= 1",
            "save_every_n_steps": ">= 1",
            "keep_last_n": ">= 1",
            "log_every_n_steps": ">= 1",
        },
    )
    if args.max_epochs == 0:
        raise UserError(
            f"--max_epochs 0 trains nothing (--max_steps {args.max_steps} is never reached); give "
            "--max_epochs -1 to stop by --max_steps alone"
            if args.max_steps > 0
            else "--max_epochs 0 trains nothing; give a positive --max_epochs"
        )
    from vlmdiff.training import check_devices

    check_devices(args.accelerator, args.devices)


def _ckpt_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_root) / f"ckpt_{args.exp_name}"


def run(args: argparse.Namespace) -> Path:
    """Train in the checkpoint folder main() holds (``args`` as :func:`resolve_defaults` left them)."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ldm.config import to_dict
    from utils.provenance import provenance
    from vlmdiff.checkpoint import load_vlmdiff
    from vlmdiff.data import build_dataset
    from vlmdiff.training import (
        FiniteTraining,
        PerRankSeed,
        Preempted,
        SaveOnSigterm,
        SaveProvenance,
        TrainerOptions,
        make_trainer,
    )
    from vlmdiff.training_checkpoints import (
        check_checkpoint_folder,
        checkpoint_callback,
        last_checkpoint,
        remove_checkpoints,
    )
    from vlmdiff.training_data import TrainedBatches, train_loader

    dataset = canonical_name(args.data_set)
    ckpt_dir = _ckpt_dir(args)
    resume_from = last_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume_from is None and args.resume_path is None:
        raise UserError(f"--resume: no {ckpt_dir / 'last.ckpt'} to continue from, and no --resume_path to start from")
    if resume_from is None and args.resume_path is None:
        raise UserError("give --resume_path (an assembled checkpoint from build_model.py) or --resume")
    replaced = check_checkpoint_folder(ckpt_dir, args.resume, args.overwrite)  # before the large checkpoint is read
    start = resume_from or Path(args.resume_path)
    if not Path(args.data_path).is_dir():
        raise UserError(f"--data_path {args.data_path} is not a folder")
    captions = load_split_captions(args, "train")  # checked before the (large) checkpoint is read
    overrides = list(args.overrides) + (["unet.use_checkpoint=true"] if args.gradient_checkpointing else [])
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model, _ = load_vlmdiff(
        start,
        args.config,
        overrides,
        args.unsafe_legacy_pickle,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        fused_optimizer=args.fused_adamw,
    )
    data = build_dataset(
        dataset,
        args.data_path,
        "train",
        classes=args.classes,
        image_size=model.cfg.image_size,
        captions=captions,
        require_captions=args.use_captions,
        coco_part=coco_part(args),
    )
    loader = train_loader(data, args.batch_size, data_workers(args.num_workers, 4), args.seed)
    info = provenance(
        seed=args.seed,
        config=to_dict(model.cfg),
        start_weights=str(start),
        data_set=dataset,
        data_path=str(args.data_path),
        use_captions=args.use_captions,
    )
    callbacks = [
        FiniteTraining(),
        checkpoint_callback(ckpt_dir, args.save_every_n_epochs, args.save_every_n_steps, args.keep_last_n),
        PerRankSeed(args.seed),
        TrainedBatches(),
        SaveProvenance(info),
        SaveOnSigterm(ckpt_dir / "last.ckpt"),
    ]
    options = TrainerOptions(
        max_epochs=args.max_epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate_grad_batches,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        log_every_n_steps=args.log_every_n_steps,
        progress_bar=not args.no_progress_bar,
        log_interval=args.log_interval,
    )
    trainer = make_trainer(options, ckpt_dir, callbacks)
    remove_checkpoints(replaced)  # --overwrite: the earlier run's files go once this run is ready to train
    log.info(
        "training %d images of %d classes; %s",
        len(data),
        len(data.class_names),
        f"resuming {resume_from}" if resume_from else f"from {start}",
    )
    try:
        trainer.fit(model, train_dataloaders=loader, ckpt_path=str(resume_from) if resume_from else None)
    except SIGTERMException:
        raise Preempted() from None
    if trainer.is_global_zero:
        kept = sorted(p.name for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
        log.info(
            "done after %d steps (epoch %d): %s (--resume continues from it), %d periodic checkpoint(s)%s in %s; "
            "logs %s and TensorBoard events beside it",
            trainer.global_step,
            trainer.current_epoch,
            ckpt_dir / "last.ckpt",
            len(kept),
            f" up to {kept[-1]}" if kept else "",
            ckpt_dir,
            ckpt_dir / "logs" / "metrics.csv",
        )
    return ckpt_dir


if __name__ == "__main__":
    sys.exit(run_main(main))
