"""Recipes: one run file per paper table (``configs/recipes/NAME.yaml``), read as an OmegaConf structured config.

The dataclasses below give every key, its type and its default; a recipe file is merged onto them and
an OmegaConf dotlist from the command line (``train.epochs=10``) onto that. An unknown key or a value
of the wrong type stops before any work with one line naming the file (or override) and the key.

Paths in a recipe are relative to the folder ``reproduce.py`` runs in (the repository root, as in the
README); ``{run}`` in a path stands for the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ldm.config import build_config
from utils.errors import UserError
from utils.io import read_yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "recipes"
DATASETS = ("mvtec", "visa", "realiad", "coco")


@dataclass
class Resources:
    """What one job of a stage asks a cluster for (SLURM: --gres=gpu:N, --cpus-per-task, --mem, --time)."""

    gpus: int = 0
    cpus: int = 4
    mem_gb: int = 16
    time: str = "01:00:00"  # SLURM --time (D-HH:MM:SS or HH:MM:SS)
    partition: str = ""  # empty: the cluster's default partition
    requeue: bool = False  # long jobs: let SLURM requeue them after a preemption (they resume)


@dataclass
class DataSection:
    data_set: str = "mvtec"
    data_path: str = "data/mvtec"
    coco_parts: list[int] = field(default_factory=list)  # COCO-AD: [0, 1, 2, 3], one run per part
    # image counts per run (one entry, or one per COCO-AD part): the GPU-hour estimate and the test shards
    train_images: list[int] = field(default_factory=list)
    test_images: list[int] = field(default_factory=list)
    counts_note: str = ""  # where the counts come from (exact or estimated)


@dataclass
class DemoSection:
    """The tiny recipe only: generate the demo dataset and a random-start stand-in for Stable Diffusion."""

    enabled: bool = False
    classes: list[str] = field(default_factory=lambda: ["coffee"])
    n_train: int = 4
    n_test_good: int = 2
    n_test_defect: int = 4
    image_size: int = 64
    seed: int = 0
    config: str = "demo"
    resources: Resources = field(default_factory=Resources)


@dataclass
class CaptionsStage:
    vlm_model: str = "internvl"
    prompt_type: str = "pd"
    folder: str = ""  # default: {data_set}_captions_{vlm}_{prompt_type} beside the dataset root (upstream's place)
    caption_model: str = "_internvl"  # COCO-AD: suffix of annotations/captions_{train,val}2017{suffix}.json
    batch_size: int = 1
    device: str = "auto"
    shards: int = 1  # SLURM: a job array of this many shards (train then test images), then one merge job
    images: int = 0  # images to caption, for the shard bounds (0: the data set's train + test counts)
    extra_args: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    merge_resources: Resources = field(default_factory=Resources)


@dataclass
class AutoencoderStage:
    checkpoint: str = ""  # a finetuned autoencoder to use instead of finetuning (e.g. a released one; per part: {part})
    config: str = "sd15"
    resume_path: str = "models/autoencoders.ckpt"  # SD's kl-f8 autoencoder, the starting point
    vgg_weights: str = "models/vgg16-397923af.pth"
    max_steps: int = 60001
    batch_size: int = 1
    accumulate_grad_batches: int = 8
    base_lr: float = 4.5e-5
    perceptual_weight: float = 1.0
    precision: str = "32"
    seed: int = 1
    extra_args: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass
class BuildStage:
    sd_path: str = "models/v1-5-pruned.ckpt"
    config: str = "sd15"
    seed: int = 1
    extra_args: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass
class TrainStage:
    epochs: int = 300
    save_every_n_epochs: int = 25
    batch_size: int = 12  # per GPU
    effective_batch: int = 48  # batch_size x accumulation x GPUs; accumulation = effective / (batch x GPUs)
    lr: float = 1e-5  # kept at any GPU count: the effective batch stays effective_batch
    use_captions: bool = True
    precision: str = "32"
    seed: int = 1
    num_workers: int = 4
    extra_args: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)


@dataclass
class TestStage:
    use_captions: bool = False  # guide each test image by its caption (COCO-AD); off: the empty caption
    feature_extractor: str = "dino_v1s8"
    ddim_steps: int = 10
    noise_t: int = 999
    sigma: float = 5.0
    image_pooling: str = "paper"
    feature_input_size: int = 0  # 0: the extractor's own
    precision: str = "32"
    batch_size: int = 8
    seed: int = 1
    shards: int = 1  # SLURM: a job array of this many shards, then one merge job
    save_visuals: bool = False
    extra_args: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    merge_resources: Resources = field(default_factory=Resources)


@dataclass
class Recipe:
    name: str = ""
    description: str = ""
    data: DataSection = field(default_factory=DataSection)
    demo: DemoSection = field(default_factory=DemoSection)
    captions: CaptionsStage = field(default_factory=CaptionsStage)
    autoencoder: AutoencoderStage = field(default_factory=AutoencoderStage)
    build: BuildStage = field(default_factory=BuildStage)
    train: TrainStage = field(default_factory=TrainStage)
    test: TestStage = field(default_factory=TestStage)
    report_resources: Resources = field(default_factory=Resources)
    threads: int = 0  # torch CPU threads per job (0: torch's default here, --cpus-per-task under SLURM)


def recipe_path(name: str) -> Path:
    """``configs/recipes/NAME.yaml`` for a recipe name, or ``name`` itself when it is a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"--recipe {name}: file not found")
        return path
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise UserError(f"--recipe {name}: unknown recipe; use one of {', '.join(known)} or a path to a .yaml file")
    return path


def load_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe ``name`` (a name in configs/recipes/ or a YAML path) with dotlist ``overrides`` applied."""
    path = recipe_path(name)
    recipe = build_config(Recipe, [(str(path), read_yaml(path))], overrides)
    if not recipe.name:
        recipe.name = path.stem
    check_recipe(recipe, str(path))
    return recipe


def check_recipe(recipe: Recipe, where: str) -> None:
    """Values OmegaConf's types cannot check: the data set, the parts, the counts, the batch rule."""
    data = recipe.data
    if data.data_set not in DATASETS:
        raise UserError(f"{where}: key 'data.data_set': {data.data_set!r} is not one of {', '.join(DATASETS)}")
    if data.data_set == "coco":
        if not data.coco_parts or any(p not in (0, 1, 2, 3) for p in data.coco_parts):
            raise UserError(f"{where}: key 'data.coco_parts': COCO-AD needs parts from 0..3, got {data.coco_parts}")
    elif data.coco_parts:
        raise UserError(f"{where}: key 'data.coco_parts': only for data_set coco")
    n_runs = max(1, len(data.coco_parts))
    for key in ("train_images", "test_images"):
        counts = getattr(data, key)
        if len(counts) != n_runs:
            raise UserError(f"{where}: key 'data.{key}': give {n_runs} count(s) (one per run/part), got {counts}")
    accumulation(recipe.train, where)
    for key in ("test", "captions"):
        if getattr(recipe, key).shards < 1:
            raise UserError(f"{where}: key '{key}.shards': must be >= 1")
    if recipe.train.epochs < 1 or recipe.train.save_every_n_epochs < 1:
        raise UserError(f"{where}: keys 'train.epochs' and 'train.save_every_n_epochs' must be >= 1")


def accumulation(train: TrainStage, where: str = "recipe") -> int:
    """Gradient accumulation that keeps batch_size x accumulation x GPUs = effective_batch (the paper's 48)."""
    devices = max(1, train.resources.gpus)
    per_step = train.batch_size * devices
    if train.effective_batch % per_step:
        raise UserError(
            f"{where}: keys 'train.effective_batch' {train.effective_batch}, 'train.batch_size' {train.batch_size} "
            f"and 'train.resources.gpus' {train.resources.gpus}: the effective batch must be a multiple of "
            "batch_size x GPUs (e.g. 12 x 1, 12 x 2, 12 x 4, 6 x 8 for 48)"
        )
    return train.effective_batch // per_step
