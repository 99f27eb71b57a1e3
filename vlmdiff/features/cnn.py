"""CNN feature extractors: ResNet-50 stages and EfficientNet-Lite blocks."""

from __future__ import annotations

from torch import Tensor, nn

from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from vlmdiff.features.base import FeatureExtractor


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
