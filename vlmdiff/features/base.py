"""The common base of the frozen feature extractors: eval mode for ever, optional input resize."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


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
