"""The torch Dataset over index records, and ``build_dataset``.

Items are dicts with exactly these keys:

- ``image``: float32 [3, S, S], RGB resized to S x S with PIL bilinear (antialiased) through
  torchvision ``Resize``, then ImageNet mean/std normalisation;
- ``hint``: the same tensor object as ``image`` (the SG network's input);
- ``caption``: str, "" when the image has no caption or none were given;
- ``mask``: uint8 [1, S, S], 0..255: the ground-truth mask file at S x S (``mask_order``, see
  :func:`vlmdiff.data.common.resize_mask`): by default upstream's order, the raw file values (VisA:
  defect indexes 1..k) resized bilinearly, then > 0 -> 255; with "binarize_first", > 0 -> 255
  first, then resized (soft edges); all zero for normal (and unlabelled) images;
- ``filename``: str, the stable image id (``Record.id``);
- ``class_name``: str;
- ``label``: int, 0 normal, 1 anomalous, -1 unknown (``folder`` dataset).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from utils.errors import UserError
from vlmdiff.data.captions import load_captions, match_captions
from vlmdiff.data.common import IMAGENET_MEAN, IMAGENET_STD, MASK_ORDERS, Record, load_mask, load_rgb, resize_mask
from vlmdiff.data.registry import canonical_name, check_split, index_dataset

logger = logging.getLogger(__name__)

ITEM_KEYS = ("image", "hint", "caption", "mask", "filename", "class_name", "label")


class AnomalyDataset(Dataset):
    """Images of an index as model inputs; decoding errors are UserErrors naming the file."""

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int = 256,
        captions: Mapping[str, str] | None = None,
        mask_order: str = MASK_ORDERS[0],
    ) -> None:
        if mask_order not in MASK_ORDERS:
            raise UserError(f"mask order {mask_order!r} is not one of {', '.join(MASK_ORDERS)}")
        self.records = list(records)
        self.image_size = int(image_size)
        self.captions = dict(captions or {})
        self.mask_order = mask_order
        size = (self.image_size, self.image_size)
        self._image_tf = transforms.Compose(
            [
                transforms.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @property
    def class_names(self) -> list[str]:
        """Classes in first-seen order of the index."""
        return list(dict.fromkeys(r.class_name for r in self.records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        pil = load_rgb(rec.image_path)
        image = self._image_tf(pil)  # (3, S, S)
        if rec.mask_path is not None:
            raw = load_mask(rec.mask_path, pil.size, rec.image_path)
            mask = torch.from_numpy(resize_mask(raw, self.image_size, self.mask_order))[None]  # (1, S, S)
        else:
            mask = torch.zeros(1, self.image_size, self.image_size, dtype=torch.uint8)
        return {
            "image": image,
            "hint": image,
            "caption": self.captions.get(rec.id, ""),
            "mask": mask,
            "filename": rec.id,
            "class_name": rec.class_name,
            "label": int(rec.label),
        }


def build_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    *,
    classes: Sequence[str] | None = None,
    image_size: int = 256,
    captions: Mapping[str, str] | str | os.PathLike | None = None,
    require_captions: bool = False,
    coco_part: int | None = None,
    mask_order: str = MASK_ORDERS[0],
) -> AnomalyDataset:
    """Index ``split`` of dataset ``name`` at ``root`` and wrap it as an :class:`AnomalyDataset`.

    ``captions`` is a mapping id -> caption (e.g. from :func:`load_captions`) or a caption file /
    folder to load for this split. Captions are matched to images by id; images without one get ""
    (reported; a UserError with ``require_captions``). ``mask_order``: how masks reach the image
    size (:func:`vlmdiff.data.common.resize_mask`).
    """
    key = canonical_name(name)
    check_split(split)
    records = index_dataset(key, root, split, classes=classes, coco_part=coco_part)
    matched: dict[str, str] = {}
    if captions is not None:
        if isinstance(captions, (str, os.PathLike)):
            captions = load_captions(captions, split, key)
        matched = match_captions(records, captions, root=Path(root), require=require_captions)
    elif require_captions:
        raise UserError("captions are required (--use_captions) but no caption file or folder was given")
    logger.info(
        "%s %s: %d images, %d classes, %d with captions",
        key,
        split,
        len(records),
        len({r.class_name for r in records}),
        len(matched),
    )
    return AnomalyDataset(records, image_size=image_size, captions=matched, mask_order=mask_order)
