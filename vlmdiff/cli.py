"""Command-line pieces the stage scripts share: dataset, caption, model-config, device and precision flags.

Nothing here imports torch, Lightning or transformers: a script's ``--help`` is answered before they load.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError
from vlmdiff.data.captions import caption_folder_name
from vlmdiff.data.registry import aliases_note, canonical_name, dataset_choices

BATCH_SIZE = 8  # test.py's images per forward pass (bench/bench_inference.py times "ours" at it)
TRAIN_RECIPE = "train"  # configs/train.yaml


@dataclass(frozen=True)
class TrainRecipe:
    """train.py's training recipe, read from configs/train.yaml (every field has to be there).

    ``max_epochs`` and ``save_every_n_epochs`` are per dataset (canonical names); the flags of the same
    names override all of them.
    """

    lr: float
    weight_decay: float
    batch_size: int
    accumulate_grad_batches: int
    seed: int
    max_epochs: dict[str, int] = field(default_factory=dict)
    save_every_n_epochs: dict[str, int] = field(default_factory=dict)

    def for_dataset(self, key: str, dataset: str) -> int:
        """``max_epochs`` or ``save_every_n_epochs`` of ``dataset``; a dataset the recipe lacks is a UserError."""
        table = getattr(self, key)
        if dataset not in table:
            raise UserError(
                f"the training recipe (configs/{TRAIN_RECIPE}.yaml) has no {key} for {dataset}: give --{key}"
            )
        return table[dataset]


def load_train_recipe(name: str = TRAIN_RECIPE) -> TrainRecipe:
    """configs/train.yaml (or the preset/YAML ``name``) as a :class:`TrainRecipe`; a missing key is a UserError."""
    from omegaconf.errors import MissingMandatoryValue

    from ldm.config import load_config

    try:
        return load_config(name, TrainRecipe)
    except MissingMandatoryValue as e:
        raise UserError(f"training recipe {name}: key '{e.full_key}' is missing") from None


def add_data_args(
    p: argparse.ArgumentParser,
    folder: bool = False,
    required: bool = False,
    coco_part_help: str = "COCO-AD part (0..3; required for --data_set coco; -1: none)",
    classes: bool = True,
) -> None:
    """``--data_set`` (the registry's names and aliases), ``--data_path``, ``--coco_part``, ``--classes``.

    ``folder``: also offer the ``folder`` layout; ``required``: no default dataset.
    """
    p.add_argument(
        "--data_set",
        required=required,
        default=None if required else "mvtec",
        choices=dataset_choices(folder),
        help=f"dataset layout ({aliases_note()})" + ("; folder = any images, no ground truth" if folder else ""),
    )
    p.add_argument("--data_path", required=True, help="dataset root folder")
    p.add_argument("--coco_part", type=int, default=-1, choices=(-1, 0, 1, 2, 3), help=coco_part_help)
    if classes:
        p.add_argument("--classes", nargs="+", default=None, help="only these classes (default: all)")


def parse_devices(value: str) -> int | str | list[int]:
    """``--devices`` (its argparse type) as Lightning takes it: ``auto``, a count (``-1``: all), or a comma list
    of indices (``0,1``)."""
    if value == "auto":
        return value
    try:
        if "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        return int(value)
    except ValueError:
        raise UserError(f"--devices must be a number, a comma list of device indices or auto, got {value!r}") from None


parse_devices.comma_list = True  # a run file may give the list as YAML ([0, 1]): utils.cli joins it with commas


def add_caption_args(p: argparse.ArgumentParser, split: str = "train") -> None:
    """Caption flags of a stage that reads the captions of ``split`` (train.py: train; test.py: test)."""
    if split == "test":  # --test_captions: the spelling a user looks for; one flag, two names
        p.add_argument(
            "--use_captions",
            "--test_captions",
            action="store_true",
            help="guide every test image by its own caption, read from the test split's caption files "
            "(test_captions_{dataset}_{vlm}.json in the caption folder; COCO: "
            "captions_val2017{caption_model}.json; captioner.py --split test writes them); every test "
            "image needs one. Off: the empty caption, the paper's recipe for MVTec-AD, VisA, Real-IAD",
        )
    else:
        p.add_argument(
            "--use_captions",
            action="store_true",
            help=f"condition on VLM captions of the {split} split (cross-attention)",
        )
    p.add_argument(
        "--caption_folder",
        default=None,
        help="folder of caption files (default: {dataset}_captions_{vlm}_{prompt_type} beside the dataset "
        "root); a relative path not found from the working folder is looked up beside the dataset root",
    )
    p.add_argument(
        "--caption_model",
        default="_internvl",
        help="suffix of COCO caption files: annotations/captions_{train,val}2017{suffix}.json",
    )
    p.add_argument(
        "--vlm_model",
        default="internvl",
        help="the captioner's --vlm_model (internvl, blip, deepseekvl, llava, template, a model folder or id); "
        "names the caption files",
    )
    p.add_argument(
        "--prompt_type", default="pd", choices=("pd", "pa"), help="caption prompt: pd (describe) or pa (defect)"
    )


def coco_part(args: argparse.Namespace) -> int | None:
    return args.coco_part if args.coco_part >= 0 else None


def vlm_token(vlm_model: str) -> str:
    """The file-name token the captioner used for ``--vlm_model`` (internvl, blip, template, ...)."""
    from vlmdiff.captioning import derive_vlm_name

    return derive_vlm_name(vlm_model, "template" if vlm_model == "template" else "hf")


def caption_source(args: argparse.Namespace) -> Path:
    """The caption file/folder ``--use_captions`` reads (upstream's default locations).

    A relative ``--caption_folder`` that does not exist from the working folder is taken from beside the
    dataset root (``{data_path}/..``), where upstream's ``get_captions`` and its README put caption folders.
    """
    dataset = canonical_name(args.data_set)
    if args.caption_folder:
        given = Path(args.caption_folder)
        beside_root = Path(args.data_path).resolve().parent / given
        if given.exists() or given.is_absolute():
            return given
        if beside_root.exists():
            return beside_root
        raise UserError(
            f"--caption_folder {given}: found neither in the working folder nor beside the dataset root "
            f"({beside_root}); give the caption folder's path"
        )
    if dataset == "coco":
        return Path(args.data_path)
    return Path(args.data_path).resolve().parent / caption_folder_name(
        dataset, vlm_token(args.vlm_model), args.prompt_type
    )


def load_split_captions(args: argparse.Namespace, split: str) -> dict[str, str] | None:
    """Captions of ``split`` when ``--use_captions`` is on, else None (captions are then "")."""
    if not args.use_captions:
        return None
    from vlmdiff.data import load_captions

    dataset = canonical_name(args.data_set)
    vlm = None if dataset == "coco" else vlm_token(args.vlm_model)
    return load_captions(caption_source(args), split, dataset, vlm=vlm, caption_model=args.caption_model)


def add_config_args(p: argparse.ArgumentParser, default: str | None = "sd15") -> None:
    p.add_argument(
        "--config",
        default=default,
        help="model preset (sd15, mid, tiny, demo) or a YAML file"
        + ("" if default else " (default: the checkpoint's own)"),
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotlist overrides of the model config, e.g. unet.use_checkpoint=true",
    )


def model_config_to_print(args: argparse.Namespace, checkpoint: str | None) -> dict[str, Any] | None:
    """``--print_config``'s model section: what ``--config`` and the overrides resolve to for ``checkpoint``.

    Without ``--config`` that is the checkpoint's own stored config (None when there is no file to read).
    """
    from ldm.checkpoint import load_checkpoint
    from ldm.config import to_dict
    from vlmdiff.checkpoint import resolve_checkpoint_config
    from vlmdiff.config import load_model_config

    if checkpoint and Path(checkpoint).is_file():
        ckpt = load_checkpoint(checkpoint, getattr(args, "unsafe_legacy_pickle", False))
        return to_dict(resolve_checkpoint_config(ckpt, checkpoint, args.config, args.overrides))
    return to_dict(load_model_config(args.config, args.overrides)) if args.config else None


PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true")  # train.py's --precision (Lightning's)

# --precision: Lightning's names in the training scripts, autocast's short names in test.py; each
# script accepts the other spelling of the same setting.
SHORT_PRECISIONS = {"32": "32", "bf16": "bf16-mixed", "16": "16-mixed"}  # short name -> Lightning's


def lightning_precision(value: str) -> str:
    """A training script's --precision: Lightning's name (bf16 and 16 mean bf16-mixed and 16-mixed)."""
    return SHORT_PRECISIONS.get(value, value)


def short_precision(value: str) -> str:
    """test.py's --precision: 32, bf16 or 16 (32-true, bf16-mixed and 16-mixed mean the same)."""
    to_short = {lightning: short for short, lightning in SHORT_PRECISIONS.items()} | {"32-true": "32"}
    return to_short.get(value, value)


_RULES = {
    "> 0": (lambda v: v > 0, "must be greater than 0"),
    ">= 0": (lambda v: v >= 0, "must be 0 or more"),
    ">= 1": (lambda v: v >= 1, "must be 1 or more"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must be at least 0 and below 1 (a fraction of the mask's full scale)"),
    ">= 1 or -1": (lambda v: v >= 1 or v == -1, "must be 1 or more, or -1 (no limit)"),
    ">= 0 or -1": (lambda v: v >= 0 or v == -1, "must be 0 or more, or -1 (no limit)"),
}


def check_numbers(args: argparse.Namespace, rules: Mapping[str, str]) -> None:
    """Check numeric flags before any work: ``rules`` maps a flag (without ``--``) to a rule of ``_RULES``.

    A flag left at None (optional) is not checked; NaN never passes.
    """
    for name, rule in rules.items():
        value = getattr(args, name)
        if value is None:
            continue
        ok, says = _RULES[rule]
        if (isinstance(value, float) and math.isnan(value)) or not ok(value):
            raise UserError(f"--{name} {value} {says}")
