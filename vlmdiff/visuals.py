"""Pictures for inspection: input, autoencoder reconstruction, diffusion sample, heatmap, ground truth.

During a test run each image gets a strip ``input | autoencoder | sample`` (PNG). At evaluation the
heatmap overlay and the ground-truth mask are appended, with the anomaly map scaled by one range per
class (its 0.1st..99.9th percentile), so maps of one class are comparable and nothing overflows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.io import atomic_open
from vlmdiff.data.dataset import IMAGENET_MEAN as _MEAN, IMAGENET_STD as _STD

IMAGENET_MEAN = torch.tensor(_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(_STD).view(1, 3, 1, 1)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (B,3,H,W) -> (B,H,W,3) uint8, clipped to the displayable range."""
    x = x.detach().float().cpu() * IMAGENET_STD + IMAGENET_MEAN
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def visual_name(image_id: str) -> str:
    """A file name for an image id: path separators become '__'; a PNG keeps its name, any other file gets
    ``.png`` appended to its whole name (``a.jpg`` -> ``a.jpg.png``), so ``a.png`` and ``a.jpg`` stay apart."""
    flat = image_id.replace("/", "__").replace("\\", "__")
    return flat if flat.lower().endswith(".png") else f"{flat}.png"


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def write_strips(folder: Path, ids: list[str], class_names: list[str], image: torch.Tensor,
                 autoencoder: torch.Tensor, sample: torch.Tensor) -> None:
    """One ``input | autoencoder | sample`` strip per image under ``folder/{class}/``."""
    panels = [to_uint8_images(t) for t in (image, autoencoder, sample)]
    for i, (image_id, cls) in enumerate(zip(ids, class_names)):
        save_png(folder / _safe(cls) / visual_name(image_id), np.concatenate([p[i] for p in panels], axis=1))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H,W) -> a blue-to-red 'jet'-like colour (H,W,3) uint8."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)


def class_range(maps: np.ndarray) -> tuple[float, float]:
    """The display range of a class's maps: 0.1st and 99.9th percentile (robust to single hot pixels)."""
    lo, hi = np.percentile(maps.astype(np.float32), [0.1, 99.9])
    return float(lo), float(max(hi, lo + 1e-12))


def finish_class(folder: Path, class_name: str, ids: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> int:
    """Append heatmap overlay and mask to each strip of one class; returns how many were finished."""
    lo, hi = class_range(maps)
    done = 0
    for image_id, amap, mask in zip(ids, maps, masks):
        path = folder / _safe(class_name) / visual_name(str(image_id))
        if not path.is_file():
            continue
        strip = np.asarray(Image.open(path).convert("RGB"))
        h = amap.shape[0]
        if strip.shape[1] != 3 * strip.shape[0]:
            continue  # already finished by an earlier evaluation
        inp = strip[:, :h]
        heat = colormap((amap.astype(np.float32) - lo) / (hi - lo))
        overlay = (0.5 * inp + 0.5 * heat).astype(np.uint8)
        gt = np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8)
        save_png(path, np.concatenate([strip, overlay, gt], axis=1))
        done += 1
    return done


def write_upstream_visuals(folder: Path, ids: list[str], image: torch.Tensor, autoencoder: torch.Tensor,
                           sample: torch.Tensor, maps: torch.Tensor) -> None:
    """Upstream's per-image files, for users who compare with its ``log_image_{exp_name}/`` folder.

    For each image ``{name}`` (its id with path separators as ``__``): ``{name}-input.jpg``,
    ``{name}-reconstruction.jpg`` (autoencoder only), ``{name}-samples.jpg`` (diffusion sample),
    ``{name}-features.jpg`` (the anomaly map, min-max normalised per image, grey levels) and
    ``{name}-heatmap.png``: the map min-max normalised per image, OpenCV's JET colours, blended
    0.5/0.5 with the input (upstream's overlay). ``image``/``autoencoder``/``sample``: (B, 3, H, W)
    ImageNet-normalised; ``maps``: (B, H, W).
    """
    import cv2

    panels = {k: to_uint8_images(t) for k, t in (("input", image), ("reconstruction", autoencoder), ("samples", sample))}
    for i, image_id in enumerate(ids):
        stem = Path(visual_name(image_id)).stem
        for kind, arrays in panels.items():
            _save_jpeg(folder / f"{stem}-{kind}.jpg", arrays[i])
        amap = maps[i].detach().float().cpu().numpy()  # (H, W)
        grey = (255 * (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-12)).astype(np.uint8)
        _save_jpeg(folder / f"{stem}-features.jpg", np.repeat(grey[..., None], 3, axis=-1))
        jet = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)  # (H, W, 3)
        overlay = (0.5 * panels["input"][i].astype(np.float32) + 0.5 * jet.astype(np.float32)).astype(np.uint8)
        save_png(folder / f"{stem}-heatmap.png", overlay)


def _save_jpeg(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="JPEG", quality=95)
