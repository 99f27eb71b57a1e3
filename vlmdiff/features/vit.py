"""ViT (DINO, DINOv2) feature extractor and the DINO-style position-embedding interpolation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmdiff.features.base import FeatureExtractor

DINO_POS_EMBED_OFFSET = 0.1  # DINO/DINOv2 add 0.1 to the target grid in the interpolation scale factor


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
