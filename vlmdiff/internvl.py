"""InternVL2 captioning as upstream runs it: dynamic 448 px tiling (up to 12 tiles plus a thumbnail) and
``model.chat`` through the model's own remote code."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from utils.errors import UserError
from vlmdiff.data.common import IMAGENET_MEAN, IMAGENET_STD
from vlmdiff.vlm_backends import device_and_dtype, model_source, resolve_model

logger = logging.getLogger(__name__)

INTERNVL_TILE = 448
INTERNVL_MAX_TILES = 12


def internvl_grid(
    width: int, height: int, tile: int = INTERNVL_TILE, min_num: int = 1, max_num: int = INTERNVL_MAX_TILES
) -> tuple[int, int]:
    """(columns, rows) of InternVL's dynamic tiling for a ``width`` x ``height`` image.

    Among grids with ``min_num <= cols*rows <= max_num`` (ordered by tile count) the one whose aspect
    ratio is closest to the image's; on a tie the later grid wins if the image area exceeds half of it.
    """
    grids: set[tuple[int, int]] = set()  # added in upstream's order: equal counts keep its set order on ties
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    grids.add((i, j))
    ordered = sorted(grids, key=lambda g: g[0] * g[1])
    aspect, best, best_diff = width / height, (1, 1), float("inf")
    for cols, rows in ordered:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _to_normalised(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def internvl_tiles(image: Image.Image, tile: int = INTERNVL_TILE, max_num: int = INTERNVL_MAX_TILES) -> torch.Tensor:
    """InternVL2's input: the image resized (bicubic) onto its tile grid, cut row-major into ``tile`` px
    tiles, plus a whole-image thumbnail when there is more than one tile; ImageNet-normalised.

    Returns (N, 3, tile, tile) float32.
    """
    image = image.convert("RGB")
    cols, rows = internvl_grid(*image.size, tile=tile, max_num=max_num)
    grid = _to_normalised(image.resize((cols * tile, rows * tile), Image.BICUBIC))  # (3, rows*T, cols*T)
    tiles = grid.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        thumb = _to_normalised(image.resize((tile, tile), Image.BICUBIC))  # (3, T, T)
        tiles = torch.cat([tiles, thumb[None]])
    return tiles  # (N, 3, T, T)


class InternVLBackend:
    """InternVL2 via its remote code: ``model.chat(tokenizer, pixel_values, "<image>\\n" + prompt, config)``."""

    def __init__(
        self, model: str, prompt: str, dtype: str = "auto", device: str = "auto", max_new_tokens: int = 1024
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.device, self.dtype = device_and_dtype(device, dtype, default_dtype="bfloat16")
        source = resolve_model(model_source(model))
        try:
            self.model = (
                AutoModel.from_pretrained(
                    source, torch_dtype=self.dtype, low_cpu_mem_usage=True, trust_remote_code=True
                )
                .eval()
                .to(self.device)
            )
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True, use_fast=False)
        except (OSError, ValueError, ImportError) as e:
            raise UserError(f"cannot load the InternVL model {source} with its remote code ({e})") from e
        self.question = "<image>\n" + prompt
        self.generation_config = {"max_new_tokens": int(max_new_tokens), "do_sample": False}
        logger.info("captioning with InternVL %s on %s, %s", source, self.device, self.dtype)

    def __call__(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[str]:
        out = []
        for im in images:  # one chat per image, as upstream
            pixel_values = internvl_tiles(im).to(self.device, self.dtype)  # (N, 3, 448, 448)
            with torch.inference_mode():
                out.append(
                    self.model.chat(self.tokenizer, pixel_values, self.question, dict(self.generation_config)).strip()
                )
        return out
