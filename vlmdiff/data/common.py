"""What every dataset shares: the index record, image/mask decoding and path checks (no torch here).

Image ids (``Record.id``) are the path of the image relative to the dataset root with forward
slashes, for every dataset (for COCO-AD: the ``img_path`` of the meta file). They are stable across
machines and are what caption files and result files are keyed by.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from utils.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
NORMAL_DEFECT = "good"
MASK_ORDERS = ("resize_first", "binarize_first")  # the first is upstream's and the default
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of every model input (not [-1, 1])
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Record:
    """One image of a dataset index.

    ``label`` is 0 (normal), 1 (anomalous) or -1 (unknown: the ``folder`` dataset). ``mask_path`` is
    None for normal/unknown images. ``defect`` is the defect type ("good" for normal images).
    """

    image_path: Path
    mask_path: Path | None
    class_name: str
    label: int
    id: str
    defect: str


def relative_id(path: Path, root: Path) -> str:
    """The stable id of ``path``: relative to ``root``, forward slashes."""
    return Path(os.path.relpath(path, root)).as_posix()


def require_dir(path: Path, expected: str) -> None:
    """Raise a UserError naming ``path`` and the expected layout unless it is a folder."""
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise UserError(f"{path} {what}; expected {expected}")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (by extension, case-insensitive), sorted, hidden files skipped.

    ``recursive`` descends into sub-folders, symlinked ones included (each real folder once, so a
    link loop ends), skipping hidden folders.
    """
    if not recursive:
        candidates: Iterable[Path] = folder.iterdir()
    else:
        candidates, seen = [], set()
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            candidates.extend(Path(dirpath) / f for f in filenames)
    return sorted(
        p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def check_utf8_names(records: Sequence[Record], root: Path) -> None:
    """Every image id must be valid UTF-8: ids go into JSON, CSV and caption files (one UserError otherwise)."""
    bad = []
    for r in records:
        try:
            r.id.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(r.id)
    if bad:
        example = os.fsencode(bad[0]).decode("utf-8", "backslashreplace")
        raise UserError(
            f"{len(bad)} file name(s) under {root} are not valid UTF-8, e.g. {example}; rename them "
            "to UTF-8 (e.g. convmv -f latin1 -t utf8 -r --notest DIR)"
        )


def check_files_exist(paths: Iterable[Path], what: str, source: str) -> None:
    """Raise one UserError listing (count + examples) the files of ``paths`` that do not exist."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        examples = ", ".join(str(p) for p in missing[:3])
        raise UserError(
            f"{len(missing)} {what} listed by {source} not found, e.g. {examples} "
            "(incomplete download or wrong --data_path?)"
        )


def select_classes(available: Sequence[str], wanted: Sequence[str] | None, root: Path, expected: str) -> list[str]:
    """Apply a class filter: every wanted class must be available (else one UserError)."""
    if not available:
        raise UserError(f"no classes found in {root}; expected {expected}")
    if wanted is None:
        return list(available)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise UserError(
            f"class(es) {', '.join(unknown)} not found in {root} (expected {expected}); "
            f"available: {', '.join(available)}"
        )
    return list(dict.fromkeys(wanted))


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 8 bit (16-bit: divide by 257, never clip)."""
    if arr.dtype == np.uint8:
        return arr
    if mode == "F" or np.issubdtype(arr.dtype, np.floating):
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / 65535.0 if hi > 255.0 else 1.0)
        return np.clip(arr.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
    # "I;16*" modes are 16 bit; 32-bit "I" from a 16-bit PNG holds 0..65535
    hi = int(arr.max()) if arr.size else 0
    if mode.startswith("I;16") or hi > 255:
        return np.clip(arr.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: grayscale copied to 3 channels, 16-bit scaled to 8, alpha over black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode, upright: an EXIF orientation tag (camera JPEGs) is applied to images and
    masks alike, as viewers show them. Truncation is detected unless PIL's LOAD_TRUNCATED_IMAGES was
    switched on."""
    try:
        img = Image.open(path)
        img.load()
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except FileNotFoundError as e:
        raise UserError(f"{what} {path} not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{what} {path} is corrupt or truncated ({e}); re-download or remove it") from e
    return img


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB PIL image; a corrupt/truncated file is a UserError naming it."""
    return _to_rgb(_open(Path(path), "image"))


def load_mask(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None, image_path: str | os.PathLike | None = None
) -> Image.Image:
    """Decode a ground-truth mask to an 8-bit "L" image (0..255, 16-bit scaled, 1-bit -> 0/255).

    With ``image_size`` (width, height), a mask of another size is a UserError naming both files.
    """
    img = _open(Path(path), "mask")
    if img.mode.startswith("I") or img.mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L")
    elif img.mode != "L":
        img = img.convert("L")
    if image_size is not None and img.size != tuple(image_size):
        raise UserError(
            f"mask {path} is {img.size[0]}x{img.size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}; masks must have the size of their image"
        )
    return img


def resize_mask(mask: Image.Image, size: int, order: str = "resize_first") -> np.ndarray:
    """A ground-truth mask ("L" image, as :func:`load_mask` returns it) at ``size`` x ``size``, uint8 0..255.

    ``order`` "resize_first" (upstream's order, the default): the raw file values (VisA: defect
    indexes 1..k) are resized with PIL's bilinear filter (8-bit, rounded after each axis), then
    ``> 0`` -> 255, else 0. A thin or tiny defect whose resized values round to 0 is lost, as upstream
    loses it. ``order`` "binarize_first": ``> 0`` -> 255 first, then the bilinear resize; the result
    keeps soft edges (0..255, the covered fraction), so regions are larger and thin or tiny defects
    that the other order drops are kept, and a ground-truth threshold (``mask_threshold``) can pick
    the coverage that counts.
    """
    if order not in MASK_ORDERS:
        raise UserError(f"mask order {order!r} is not one of {', '.join(MASK_ORDERS)}")
    if mask.mode != "L":
        raise ValueError(f"resize_mask expects an 'L' image (load_mask returns one), got mode {mask.mode}")
    if order == "binarize_first":
        binary = Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), "L")
        return np.array(binary.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    resized = np.asarray(mask.resize((size, size), Image.Resampling.BILINEAR))
    return np.where(resized > 0, 255, 0).astype(np.uint8)
