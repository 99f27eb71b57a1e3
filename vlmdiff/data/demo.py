"""Generate a small MVTec-AD-layout demo dataset from real photographs shipped by installed packages.

The photographs come from scikit-image's bundled data (textures ``brick``, ``grass``, ``gravel``;
objects ``coffee``, ``chelsea``, ``rocket``, ``astronaut``) and scikit-learn's sample images
(``china``, ``flower``), so nothing is downloaded. Each class is one photograph:

- train (normal): random crops of the photo with flips (any flip/rotation for textures, horizontal
  flip only for objects) and a slight brightness/contrast jitter;
- test/good: more normal crops;
- test/{scratch,stain,hole,patch}: normal crops with one synthetic defect each, written with its
  exact binary mask (0/255) to ``ground_truth/{defect}/{stem}_mask.png``. Only the pixels under the
  mask are changed, so mask and defect align by construction.

Texture classes are written as 8-bit grayscale PNGs (like MVTec's grayscale classes), objects as RGB.
Everything is deterministic: the same seed and parameters give byte-identical files, and every
image's randomness depends only on (seed, class, split, index), so adding a class does not change
the others. A ``demo_dataset.json`` marker at the root records the parameters; rerunning with the
same parameters after a completed run is a no-op, and an interrupted run is simply redone.

Usage: ``python -m vlmdiff.data.demo --output DIR [--classes brick coffee] [--n_train 16] ...``
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from utils.errors import UserError
from utils.io import read_json, write_bytes, write_json

logger = logging.getLogger(__name__)

# name -> (source, is_texture); source "skimage:<fn>" or "sklearn:<file>"
SOURCES: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {
        "brick": ("skimage:brick", True),
        "grass": ("skimage:grass", True),
        "gravel": ("skimage:gravel", True),
        "coffee": ("skimage:coffee", False),
        "chelsea": ("skimage:chelsea", False),
        "rocket": ("skimage:rocket", False),
        "astronaut": ("skimage:astronaut", False),
        "china": ("sklearn:china.jpg", False),
        "flower": ("sklearn:flower.jpg", False),
    }
)
DEFAULT_CLASSES: tuple[str, ...] = ("brick", "gravel", "coffee", "chelsea")
DEFECTS: tuple[str, ...] = ("scratch", "stain", "hole", "patch")
MARKER = "demo_dataset.json"
_SPLIT_CODE: Mapping[str, int] = MappingProxyType({"train": 0, "test_good": 1, "test_defect": 2})


def load_source_photo(name: str) -> np.ndarray:
    """The source photograph of demo class ``name``: uint8 array (H, W) for textures, (H, W, 3) else."""
    if name not in SOURCES:
        raise UserError(f"unknown demo class {name!r}; valid: {', '.join(sorted(SOURCES))}")
    source, _ = SOURCES[name]
    kind, key = source.split(":", 1)
    if kind == "skimage":
        from skimage import data

        arr = getattr(data, key)()
    else:
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(key)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _rng(seed: int, cls: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cls.encode()), _SPLIT_CODE[split], index])


def _normal_crop(photo: np.ndarray, texture: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """A jittered crop of ``photo`` resized to ``size`` x ``size`` (uint8, same channel layout)."""
    h, w = photo.shape[:2]
    short = min(h, w)
    if texture:
        side = int(short * rng.uniform(0.5, 0.7))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
    else:
        side = int(short * rng.uniform(0.85, 0.95))
        cy = (h - side) / 2 + rng.uniform(-0.03, 0.03) * side
        cx = (w - side) / 2 + rng.uniform(-0.03, 0.03) * side
        y0 = int(np.clip(round(cy), 0, h - side))
        x0 = int(np.clip(round(cx), 0, w - side))
    crop = photo[y0 : y0 + side, x0 : x0 + side]
    if texture:
        crop = np.rot90(crop, int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            crop = crop[::-1]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    gain, bias = rng.uniform(0.95, 1.05), rng.uniform(-6.0, 6.0)
    return np.clip(arr * gain + bias, 0, 255).round().astype(np.uint8)


def _draw_mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _blob(size: int, rng: np.random.Generator, rmin: float, rmax: float) -> np.ndarray:
    """An irregular filled polygon (radial noise around an ellipse) as a boolean mask."""
    r = size * rng.uniform(rmin, rmax)
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=12))
    radii = r * rng.uniform(0.6, 1.0, size=12)
    aspect = rng.uniform(0.6, 1.0)
    pts = [
        (float(cx + rr * np.cos(a)), float(cy + aspect * rr * np.sin(a))) for a, rr in zip(angles, radii, strict=True)
    ]
    return _draw_mask(size, lambda d: d.polygon(pts, fill=255))


def _add_defect(
    img: np.ndarray, defect: str, rng: np.random.Generator, other: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return (defective image, boolean mask); only pixels under the mask differ from ``img``."""
    size = img.shape[0]
    gray = img.ndim == 2
    out = img.astype(np.float32)
    chan = out[..., None] if gray else out
    for _ in range(20):  # redraw until the defect is big enough to see
        if defect == "scratch":
            n = int(rng.integers(2, 5))
            pts = [tuple(float(v) for v in rng.uniform(0.1 * size, 0.9 * size, size=2)) for _ in range(n)]
            width = max(1, size // 64)
            mask = _draw_mask(size, lambda d: d.line(pts, fill=255, width=width))  # noqa: B023 (called at once)
        elif defect in ("stain", "hole"):
            mask = _blob(size, rng, 0.06, 0.12)
        else:  # patch
            side = int(size * rng.uniform(0.15, 0.25))
            y0, x0 = (int(v) for v in rng.integers(0, size - side, size=2))
            mask = np.zeros((size, size), dtype=bool)
            mask[y0 : y0 + side, x0 : x0 + side] = True
        if mask.sum() >= max(4, 0.002 * size * size):
            break
    if defect == "scratch":
        value = rng.uniform(0, 40) if chan[mask].mean() > 110 else rng.uniform(215, 255)
        chan[mask] = value
    elif defect == "stain":
        colour = rng.uniform([60, 30, 0], [140, 90, 40]) if not gray else rng.uniform(20, 70, size=1)
        alpha = rng.uniform(0.6, 0.8)
        chan[mask] = (1 - alpha) * chan[mask] + alpha * colour
    elif defect == "hole":
        chan[mask] = rng.uniform(0, 20)
    else:
        ys, xs = np.nonzero(mask)
        y0, x0, side = ys.min(), xs.min(), ys.max() - ys.min() + 1
        src = np.asarray(Image.fromarray(other).resize((size, size), Image.BILINEAR))
        sy, sx = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        piece = np.rot90(src[sy : sy + side, sx : sx + side], int(rng.integers(1, 4))).astype(np.float32)
        if gray and piece.ndim == 3:
            piece = piece @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if not gray and piece.ndim == 2:
            piece = np.repeat(piece[..., None], 3, axis=2)
        chan[y0 : y0 + side, x0 : x0 + side] = piece.reshape(chan[y0 : y0 + side, x0 : x0 + side].shape)
    out = np.clip(out, 0, 255).round().astype(np.uint8)
    return out, mask


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _params(
    classes: Sequence[str], n_train: int, n_test_good: int, n_test_defect: int, image_size: int, seed: int
) -> dict:
    return {
        "classes": list(classes),
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "image_size": image_size,
        "seed": seed,
    }


def _check_output(root: Path, params: dict, overwrite: bool) -> bool:
    """True if ``root`` already holds a completed demo with ``params``; raise if it holds anything else."""
    marker = root / MARKER
    if marker.is_file():
        old = read_json(marker)
        if old.get("params") == params:
            return bool(old.get("complete"))
        if not overwrite:
            raise UserError(
                f"{root} holds a demo dataset made with other parameters ({marker}); "
                "choose another folder or pass --overwrite"
            )
        for cls in set(old.get("params", {}).get("classes", [])) | set(params["classes"]):
            if cls in SOURCES:
                shutil.rmtree(root / cls, ignore_errors=True)
        return False
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise UserError(f"{root} is not empty and is not a demo dataset; choose an empty folder")
        for cls in params["classes"]:
            shutil.rmtree(root / cls, ignore_errors=True)
    return False


def generate_demo_dataset(
    root: str | Path,
    classes: Sequence[str] = DEFAULT_CLASSES,
    n_train: int = 16,
    n_test_good: int = 4,
    n_test_defect: int = 8,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an MVTec-AD-layout demo dataset under ``root`` and return ``root``.

    Per class: ``n_train`` normal train images, ``n_test_good`` normal test images and
    ``n_test_defect`` defective test images (defect types cycle through scratch, stain, hole, patch),
    each ``image_size`` x ``image_size`` pixels.
    """
    root = Path(root)
    classes = list(classes)
    for cls in classes:
        if cls not in SOURCES:
            raise UserError(f"unknown demo class {cls!r}; valid: {', '.join(sorted(SOURCES))}")
    if min(n_train, n_test_good, n_test_defect) < 0 or image_size < 16:
        raise UserError("demo counts must be >= 0 and image_size >= 16")
    params = _params(classes, n_train, n_test_good, n_test_defect, image_size, seed)
    if _check_output(root, params, overwrite):
        logger.info("demo dataset already complete at %s", root)
        return root
    write_json(root / MARKER, {"params": params, "complete": False})
    photos = {name: load_source_photo(name) for name in classes}
    for ci, cls in enumerate(classes):
        photo, texture = photos[cls], SOURCES[cls][1]
        other_name = classes[(ci + 1) % len(classes)] if len(classes) > 1 else ("china" if cls != "china" else "flower")
        other = photos.get(other_name)
        if other is None:
            other = load_source_photo(other_name)
        for i in range(n_train):
            img = _normal_crop(photo, texture, image_size, _rng(seed, cls, "train", i))
            write_bytes(root / cls / "train" / "good" / f"{i:03d}.png", _png_bytes(img))
        for i in range(n_test_good):
            img = _normal_crop(photo, texture, image_size, _rng(seed, cls, "test_good", i))
            write_bytes(root / cls / "test" / "good" / f"{i:03d}.png", _png_bytes(img))
        for i in range(n_test_defect):
            rng = _rng(seed, cls, "test_defect", i)
            defect = DEFECTS[i % len(DEFECTS)]
            stem = f"{i // len(DEFECTS):03d}"
            img, mask = _add_defect(_normal_crop(photo, texture, image_size, rng), defect, rng, other)
            write_bytes(root / cls / "test" / defect / f"{stem}.png", _png_bytes(img))
            write_bytes(
                root / cls / "ground_truth" / defect / f"{stem}_mask.png", _png_bytes(mask.astype(np.uint8) * 255)
            )
        logger.info(
            "demo class %s: %d train, %d test good, %d test defective", cls, n_train, n_test_good, n_test_defect
        )
    write_json(root / MARKER, {"params": params, "complete": True, "sources": {c: SOURCES[c][0] for c in classes}})
    return root


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the dataset to (empty or a previous demo)")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), help=f"from: {', '.join(SOURCES)}")
    p.add_argument("--n_train", type=int, default=16)
    p.add_argument("--n_test_good", type=int, default=4)
    p.add_argument("--n_test_defect", type=int, default=8)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a demo made with other parameters")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m vlmdiff.data.demo``."""
    from utils.cli import setup_logging

    args = parse_args(argv)
    setup_logging(args.verbose)
    generate_demo_dataset(
        args.output,
        args.classes,
        args.n_train,
        args.n_test_good,
        args.n_test_defect,
        args.image_size,
        args.seed,
        args.overwrite,
    )


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
