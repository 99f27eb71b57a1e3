"""The galleries of a report: which images each shows (false alarms, misses, best detections) and their
pictures, a run's strips or panels put together from its stored maps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from utils.io import atomic_open
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.run_folder import RunFolder
from vlmdiff.evaluation.visuals import PANEL_SIZE, class_range, colormap, overlay

log = logging.getLogger(__name__)

MISSES = "misses (anomalous images scored below the image threshold, lowest first)"


def galleries(
    rows: list[dict[str, str]], size: int, thresholds: dict[str, float] | None = None
) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Per class: the ``size`` highest-scoring normal images (false alarms), the lowest-scoring anomalous
    images scored below the class's image threshold (misses: ``thresholds[class]``, the run's F1-max
    threshold; anomalous = score >= it) and the highest-scoring anomalous images (best detections); for
    unlabelled images the highest and lowest scores. Ties are broken by image id.
    """
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    for cls in dict.fromkeys(r["class"] for r in rows):
        mine = sorted((r for r in rows if r["class"] == cls), key=lambda r: r["id"])
        normal = [r for r in mine if r["label"] == "0"]
        anomalous = [r for r in mine if r["label"] == "1"]
        score = lambda r: float(r["image_score"])  # noqa: E731
        if normal or anomalous:
            t = (thresholds or {}).get(cls)
            missed = [] if t is None else [r for r in anomalous if score(r) < t]
            out[cls] = {
                "false alarms (highest-scoring normal images)": sorted(normal, key=score, reverse=True)[:size],
                MISSES: sorted(missed, key=score)[:size],
                "best detections (highest-scoring anomalous images)": sorted(anomalous, key=score, reverse=True)[:size],
            }
        else:
            out[cls] = {
                "highest scores": sorted(mine, key=score, reverse=True)[:size],
                "lowest scores": sorted(mine, key=score)[:size],
            }
    return out


def gallery_pictures(
    run: RunFolder, cls: str, wanted: list[dict[str, str]], display_range: tuple[float, float] | None
) -> tuple[dict[str, str], tuple[float, float] | None]:
    """``{id: path relative to run}`` of the picture of each gallery image: its strip when the run has one,
    else panels ``input | anomaly map | overlay [| ground truth]`` put together here from its stored map
    (plain image panels in a JPEG, no matplotlib: a large run draws hundreds). Also returns the colour range
    used."""
    pictures = {
        r["id"]: r["visual_path"] for r in wanted if r.get("visual_path") and run.resolve(r["visual_path"]).is_file()
    }
    missing = [r for r in wanted if r["id"] not in pictures]
    if not missing:
        return pictures, display_range
    stored = MapStore(run.maps).read_images(cls, [r["id"] for r in missing])
    if not stored:
        return pictures, display_range
    if display_range is None:
        display_range = _range([v["map"] for v in stored.values()])
    lo, hi = display_range
    no_input = 0
    for r in missing:
        if r["id"] not in stored:
            continue
        amap, mask = stored[r["id"]]["map"].astype(np.float32), stored[r["id"]]["mask"]
        image = _input_image(r.get("image_path", ""), amap.shape)
        if image is None:
            no_input += 1
            image = np.full((*amap.shape, 3), 128, np.uint8)
        panels = [image, colormap((amap - lo) / (hi - lo)), overlay(image, amap, display_range)]
        if r["label"] in ("0", "1"):
            panels.append(np.repeat(mask[..., None], 3, axis=-1))
        path = run.gallery_picture(cls, r["id"])
        with atomic_open(path, "wb") as f:  # JPEG: encoded several times faster than PNG, and smaller
            Image.fromarray(_side_by_side(panels)).save(f, format="JPEG", quality=90)
        pictures[r["id"]] = run.relative(path)
    if no_input:
        log.warning(
            "class %s: %d gallery images have no readable image file (image_path in scores.csv); "
            "their input panel is grey",
            cls,
            no_input,
        )
    return pictures, display_range


def _side_by_side(panels: list[np.ndarray], size: int = PANEL_SIZE, gap: int = 4) -> np.ndarray:
    """(H,W,3) uint8 panels resized to ``size`` (nearest) and set in a row with white gaps."""
    row = np.full((size, len(panels) * (size + gap) - gap, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        row[:, i * (size + gap) : i * (size + gap) + size] = np.asarray(
            Image.fromarray(p).resize((size, size), Image.NEAREST)
        )
    return row


def _range(maps: list[np.ndarray]) -> tuple[float, float]:
    return class_range(np.stack(maps))


def _input_image(path: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The input image at map size (H, W, 3) uint8; None when the file is not there (any more)."""
    h, w = shape
    if not path or not Path(path).is_file():
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))
