"""Stage 2: finetune the KL autoencoder (first stage) on the train images of a dataset.

Starts from Stable Diffusion's kl-f8 autoencoder (``--resume_path``: the original kl-f8
``model.ckpt``, an SD-1.5 ``.ckpt``/``.safetensors`` whose ``first_stage_model.*`` is taken, a plain
autoencoder state dict, or a finetuned first-stage checkpoint; ``none`` = random initialisation) and
trains it with upstream's loss: L1 + LPIPS reconstruction NLL, KL (weight 1e-6) and, from generator
update ``disc_start`` (50001) on, a PatchGAN hinge loss with adaptive weight x 0.5. Adam betas
(0.5, 0.9), lr = base_lr (4.5e-5) x batch size (1), gradient accumulation 8. The images are
ImageNet-normalised, as upstream feeds them. Training hyper-parameters come from
``configs/autoencoder.yaml`` (``--recipe``); flags override them. The default budget is that
file's ``max_steps: 60001`` generator updates (480,008 images at batch 1 x accumulation 8): updates
0..50000 train with L1 + LPIPS + KL, updates 50001..60000 with the PatchGAN loss too, so the GAN
phase is reached as in upstream's run (whose implicit 1000 epochs passed disc_start). A budget of
``--max_steps`` <= 50001 never reaches the PatchGAN loss (the log says so); giving only
``--max_epochs`` trains for that many epochs instead.

LPIPS needs two weight files, read locally (nothing is downloaded): torchvision's VGG16
(``--vgg_weights``, default models/vgg16-397923af.pth, from
https://download.pytorch.org/models/vgg16-397923af.pth) and the LPIPS linear layers (shipped inside
the ``lpips`` package, or ``--lpips_weights``). A starting checkpoint that carries ``loss.*`` LPIPS
weights (kl-f8 ``model.ckpt``) provides them unless those flags are given. ``--perceptual_weight 0``
trains without LPIPS and needs neither file (its checkpoints then lack ``loss.perceptual_loss.*``).

Run folder (``--output_dir``, default runs/autoencoder_{dataset}[_part{p}][_{exp_name}]):
``config.yaml``, ``checkpoints/last.ckpt`` (every ``--save_every_n_steps`` generator steps, each
epoch end and at the end; ``--resume`` continues from it with optimiser and step state),
``autoencoder.ckpt`` (final weights under upstream's names + the resolved config: give it to
build_model.py), ``images/step_*.png`` (inputs over reconstructions) and CSV/TensorBoard logs.
SIGTERM (SLURM preemption or time limit) saves ``checkpoints/last.ckpt`` and exits with code 143 (continue
with ``--resume``); a non-finite loss stops the run with an error naming the step, and no checkpoint is
written with NaN/inf weights.
``logs/metrics.csv`` and ``tensorboard/`` hold the logs (a resumed run appends to both).

Example: python finetune_autoencoder.py --data_set mvtec --data_path data/mvtec --resume_path models/autoencoders.ckpt
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.cli import (
    HelpFormatter,
    add_old_spelling,
    add_run_file_args,
    data_workers,
    parse_with_run_file,
    print_config,
    run_main,
    setup_logging,
)
from utils.errors import UserError
from utils.progress import add_progress_args

logger = logging.getLogger("finetune_autoencoder")

DEFAULT_RESUME_PATH = "models/autoencoders.ckpt"  # upstream's name for kl-f8's model.ckpt
KL_F8_URL = "https://ommer-lab.com/files/latent-diffusion/kl-f8.zip"


def build_parser() -> argparse.ArgumentParser:
    from vlmdiff.cli import add_data_args, lightning_precision, parse_devices

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(p, folder=True, required=True, coco_part_help="COCO-AD part (0..3) to train on; -1: none")
    p.add_argument(
        "--config",
        default="sd15",
        help="model preset (sd15, mid, tiny, demo) or YAML whose autoencoder: section is trained",
    )
    p.add_argument(
        "--recipe",
        default="autoencoder",
        help="the finetuning recipe (hyper-parameters): a name in configs/ "
        "(autoencoder = configs/autoencoder.yaml) or a YAML file",
    )
    add_old_spelling(p, "--train_config", "--recipe")
    p.add_argument(
        "--resume_path",
        default=DEFAULT_RESUME_PATH,
        help=f"starting weights (kl-f8 model.ckpt from {KL_F8_URL}); 'none' = random initialisation",
    )
    p.add_argument("--unsafe_legacy_pickle", action="store_true", help="allow arbitrary pickles (trusted files only)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in the run folder")
    p.add_argument("--batch_size", type=int, default=None, help="per device (default: the finetuning config's, 1)")
    p.add_argument(
        "--accumulate_grad_batches",
        type=int,
        default=None,
        help="batches per generator update (default: the finetuning config's, 8)",
    )
    p.add_argument(
        "--base_lr",
        type=float,
        default=None,
        help="lr = base_lr x batch size (default: the finetuning config's, 4.5e-5)",
    )
    p.add_argument(
        "--max_steps",
        type=int,
        default=None,
        help="generator updates; the PatchGAN loss runs from update disc_start on, never if max_steps <= "
        "disc_start; -1: no limit (default: the finetuning config's, 60001)",
    )
    p.add_argument(
        "--max_epochs",
        type=int,
        default=None,
        help="epochs (-1: no limit); given alone, it replaces the step budget (default: the finetuning config's, -1)",
    )
    p.add_argument(
        "--disc_start",
        type=int,
        default=None,
        help="generator update the PatchGAN loss starts at (default: the finetuning config's, 50001)",
    )
    p.add_argument(
        "--kl_weight", type=float, default=None, help="KL loss weight (default: the finetuning config's, 1e-6)"
    )
    p.add_argument(
        "--disc_weight", type=float, default=None, help="GAN loss weight (default: the finetuning config's, 0.5)"
    )
    p.add_argument(
        "--perceptual_weight",
        type=float,
        default=None,
        help="LPIPS weight; 0 = no LPIPS (default: the finetuning config's, 1.0)",
    )
    p.add_argument(
        "--vgg_weights", default=None, help="torchvision vgg16-397923af.pth (default: models/vgg16-397923af.pth)"
    )
    p.add_argument(
        "--lpips_weights", default=None, help="LPIPS v0.1 VGG linear layers (default: from the lpips package)"
    )
    p.add_argument("--image_size", type=int, default=None, help="default: the model config's image_size")
    p.add_argument("--log_images_every_n_steps", type=int, default=500, help="0 = no image logging")
    p.add_argument(
        "--save_every_n_steps",
        type=int,
        default=500,
        help="update checkpoints/last.ckpt every N generator steps (0: epoch ends only)",
    )
    p.add_argument("--log_every_n_steps", type=int, default=50, help="batches between metric log rows")
    p.add_argument("--keep_checkpoints", action="store_true", help="also keep checkpoints/step=N.ckpt at each save")
    p.add_argument(
        "--output_dir", default=None, help="run folder (default: runs/autoencoder_{dataset}[_part{p}][_{exp_name}])"
    )
    p.add_argument("--exp_name", default=None, help="appended to the default run folder name (default: nothing)")
    p.add_argument("--seed", type=int, default=1, help="seed of the run (data order, initialisation)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, ...")
    p.add_argument(
        "--devices",
        default="1",
        type=parse_devices,
        help="number of devices (-1: all), a comma list of indices like 0,1, or auto",
    )
    p.add_argument(
        "--precision",
        default="32",
        type=lightning_precision,
        help="Lightning precision: 32, bf16-mixed, 16-mixed, ... (bf16 and 16 mean bf16-mixed and 16-mixed)",
    )
    p.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers (default: 8, at most the CPUs available)"
    )
    add_progress_args(p)
    add_run_file_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = parse_with_run_file(p, argv)
    for name in ("batch_size", "accumulate_grad_batches", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if (args.num_workers or 0) < 0 or args.log_images_every_n_steps < 0 or args.save_every_n_steps < 0:
        p.error("--num_workers, --log_images_every_n_steps and --save_every_n_steps must be >= 0")
    if args.log_every_n_steps < 1:
        p.error("--log_every_n_steps must be >= 1")
    return args


def train_config_from_args(args: argparse.Namespace) -> Any:
    """configs/autoencoder.yaml (or --recipe) with the flags that were given applied."""
    from ldm.models.autoencoder import load_train_config, validate_train_config

    cfg = load_train_config(args.recipe)
    top = {
        k: getattr(args, k)
        for k in ("batch_size", "accumulate_grad_batches", "base_lr", "max_steps", "max_epochs")
        if getattr(args, k) is not None
    }
    if args.max_epochs is not None and args.max_steps is None:
        top["max_steps"] = -1  # an epoch budget alone is what the user asked for
    loss = {
        k: getattr(args, k)
        for k in ("disc_start", "kl_weight", "disc_weight", "perceptual_weight")
        if getattr(args, k) is not None
    }
    cfg = dataclasses.replace(cfg, **top, loss=dataclasses.replace(cfg.loss, **loss))
    validate_train_config(cfg, "flags")
    return cfg


def loss_phases(cfg: Any) -> tuple[str, bool]:
    """Which losses run within the budget of ``cfg`` (an AutoencoderTrainConfig): a sentence, and
    whether the PatchGAN loss is certain to run (False: it never does, or only if an epoch budget
    happens to reach ``disc_start``). Generator updates are numbered 0 .. max_steps - 1."""
    base = "L1 + LPIPS + KL" if cfg.loss.perceptual_weight > 0 else "L1 + KL (no LPIPS)"
    start, steps = cfg.loss.disc_start, cfg.max_steps
    if cfg.loss.disc_factor <= 0:
        return f"{base} only: disc_factor is 0, the PatchGAN loss never counts", False
    if steps <= 0:
        return f"{base}, plus the PatchGAN loss from generator update {start} on if the epoch budget gets there", False
    if steps <= start:
        return (
            f"{base} only: the PatchGAN loss starts at generator update {start}, after this budget of {steps} "
            "updates (raise --max_steps or lower --disc_start to include it)"
        ), False
    return (
        f"{base} for generator updates 0..{start - 1}, plus the PatchGAN loss for updates {start}..{steps - 1}",
        True,
    )


def run_folder(args: argparse.Namespace, dataset: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    name = f"autoencoder_{dataset}" + (f"_part{args.coco_part}" if dataset == "coco" else "")
    return Path("runs") / (name + (f"_{args.exp_name}" if args.exp_name else ""))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)  # before the heavy imports: --help and bad flags answer at once
    import lightning.pytorch as pl
    import torch
    import yaml
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.utils.data import DataLoader

    from ldm.checkpoint import save_checkpoint
    from ldm.checkpoint_io import AtomicCheckpointIO
    from ldm.config import LatentDiffusionConfig, load_config, to_dict
    from ldm.models.autoencoder import AutoencoderTraining
    from ldm.models.autoencoder_callbacks import ReconstructionImages, StepCheckpoint
    from utils.io import write_text
    from utils.provenance import provenance
    from vlmdiff.data import build_dataset, canonical_name
    from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD
    from vlmdiff.training import (
        FiniteTraining,
        Preempted,
        SaveOnSigterm,
        SaveProvenance,
        check_devices,
        progress_callbacks,
        run_loggers,
    )

    setup_logging(args.verbose)
    devices = args.devices
    check_devices(args.accelerator, devices)
    dataset = canonical_name(args.data_set)
    model_cfg = load_config(args.config, LatentDiffusionConfig, only_own_sections=True)
    ae_cfg = model_cfg.autoencoder
    image_size = args.image_size or model_cfg.image_size
    factor = 2 ** (len(ae_cfg.ch_mult) - 1)
    if image_size % factor:
        raise UserError(
            f"--image_size {image_size} is not a multiple of the autoencoder's down-sampling factor {factor}"
        )
    train_cfg = train_config_from_args(args)
    folder = run_folder(args, dataset)
    args.output_dir = str(folder)  # the run folder is resolved, also in --print_config
    if args.print_config:
        print_config(args, autoencoder=to_dict(ae_cfg), finetune=to_dict(train_cfg), image_size=image_size)
        return
    last = folder / "checkpoints" / "last.ckpt"
    if args.resume and not last.is_file():
        raise UserError(f"--resume: no checkpoint to continue from at {last}")
    if not args.resume and last.is_file():
        raise UserError(
            f"{folder} already holds a run ({last}); pass --resume to continue it, or choose another "
            "--output_dir / --exp_name"
        )

    pl.seed_everything(args.seed, workers=True, verbose=False)
    run_config = {
        "image_size": image_size,
        "seed": args.seed,
        "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "data": {
            "data_set": dataset,
            "data_path": str(args.data_path),
            "coco_part": args.coco_part,
            "classes": args.classes,
        },
        "model_config": args.config,
    }
    module = AutoencoderTraining(ae_cfg, train_cfg, run_config)
    if not args.resume:
        _load_starting_weights(module, args)
    elif Path(args.resume_path) != Path(DEFAULT_RESUME_PATH):
        logger.info("--resume: weights come from %s, --resume_path is ignored", last)

    data = build_dataset(
        dataset,
        args.data_path,
        "train",
        classes=args.classes,
        image_size=image_size,
        coco_part=args.coco_part if dataset == "coco" else None,
    )
    if len(data) == 0:
        raise UserError(f"no training images found in {args.data_path}")
    workers = data_workers(args.num_workers, 8)
    loader = DataLoader(
        data,
        batch_size=train_cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        drop_last=False,
    )

    write_text(folder / "config.yaml", yaml.safe_dump(module.resolved_config() | {"args": vars(args)}, sort_keys=False))
    info = provenance(
        seed=args.seed,
        config=module.resolved_config(),
        start_weights=str(args.resume_path),
        data_set=dataset,
        data_path=str(args.data_path),
    )
    multi = not (devices == 1 or (isinstance(devices, list) and len(devices) == 1))
    accumulate = train_cfg.accumulate_grad_batches
    bar, progress = progress_callbacks(  # progress lines count generator updates, the budget's unit
        args.no_progress_bar,
        args.log_interval,
        step_of=lambda trainer, module: module.ae_steps,
        total_steps=lambda trainer: (
            train_cfg.max_steps
            if train_cfg.max_steps > 0
            else trainer.max_epochs * (trainer.num_training_batches // accumulate)
        ),
    )
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        precision=args.precision,
        strategy="ddp_find_unused_parameters_true" if multi else "auto",
        max_epochs=train_cfg.max_epochs if train_cfg.max_epochs > 0 else -1,
        max_steps=-1,
        logger=run_loggers(folder, csv_dir="logs", tensorboard_dir="tensorboard"),
        enable_checkpointing=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            FiniteTraining(),
            StepCheckpoint(folder / "checkpoints", args.save_every_n_steps, args.keep_checkpoints),
            ReconstructionImages(folder / "images", args.log_images_every_n_steps, IMAGENET_MEAN, IMAGENET_STD),
            SaveProvenance(info),
            SaveOnSigterm(folder / "checkpoints" / "last.ckpt"),
            *progress,
        ],
        default_root_dir=str(folder),
        enable_progress_bar=bar,
        num_sanity_val_steps=0,
        log_every_n_steps=args.log_every_n_steps,
    )
    logger.info(
        "training %s autoencoder on %d %s images at %dx%d: lr %.3g (base %.3g x batch %d), accumulation %d, "
        "budget %s generator steps / %s epochs, disc_start %d; run folder %s",
        args.config,
        len(data),
        dataset,
        image_size,
        image_size,
        train_cfg.learning_rate,
        train_cfg.base_lr,
        train_cfg.batch_size,
        train_cfg.accumulate_grad_batches,
        train_cfg.max_steps if train_cfg.max_steps > 0 else "unlimited",
        train_cfg.max_epochs if train_cfg.max_epochs > 0 else "unlimited",
        train_cfg.loss.disc_start,
        folder,
    )
    phases, with_gan = loss_phases(train_cfg)
    logger.log(logging.INFO if with_gan else logging.WARNING, "losses: %s", phases)
    try:
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if args.resume else None)
    except SIGTERMException:
        raise Preempted() from None

    if trainer.is_global_zero:
        out = folder / "autoencoder.ckpt"
        save_checkpoint(
            out,
            module.state_dict(),
            config=module.resolved_config(),
            extra={
                "global_step": module.ae_steps,
                "epoch": trainer.current_epoch,
                "provenance": {**info, "global_step": module.ae_steps, "epoch": trainer.current_epoch},
            },
        )
        logger.info(
            "done after %d generator steps: %s (give it to build_model.py); resumable state %s; images in "
            "%s; logs %s and %s",
            module.ae_steps,
            out,
            last,
            folder / "images",
            folder / "logs" / "metrics.csv",
            folder / "tensorboard",
        )


def _load_starting_weights(module: Any, args: argparse.Namespace) -> None:
    """Starting weights from --resume_path, then the LPIPS weights (from files unless the checkpoint had them)."""
    from ldm.checkpoint import load_checkpoint
    from ldm.modules.lpips import load_perceptual_weights
    from ldm.modules.lpips import resolve_perceptual_weight_files as resolve_files

    lpips = module.loss.perceptual_loss
    explicit_files = args.vgg_weights is not None or args.lpips_weights is not None
    loaded: list[str] = []
    if str(args.resume_path).lower() == "none":
        logger.warning("--resume_path none: the autoencoder starts from a RANDOM initialisation")
        if lpips is not None:
            resolve_files(args.vgg_weights, args.lpips_weights)  # fail before anything slow
    else:
        path = Path(args.resume_path)
        if not path.is_file():  # the download address whatever the path's spelling (upstream's ./models/...)
            raise UserError(
                f"starting weights {path} not found: download {KL_F8_URL} and put its model.ckpt there, or give "
                "--resume_path (kl-f8 model.ckpt, an SD-1.5 checkpoint or a finetuned autoencoder), or "
                "--resume_path none for a random start"
            )
        ckpt = load_checkpoint(path, allow_unsafe_pickle=args.unsafe_legacy_pickle)
        loaded = module.load_starting_weights(ckpt, path, use_file_perceptual=not explicit_files)
        logger.info("starting weights from %s: %s", path, ", ".join(loaded))
    if lpips is not None and "perceptual_loss" not in loaded:
        vgg, lin = resolve_files(args.vgg_weights, args.lpips_weights)
        load_perceptual_weights(lpips, vgg, lin)


if __name__ == "__main__":
    sys.exit(run_main(main))
