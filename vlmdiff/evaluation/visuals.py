"""Pictures for inspection: input, autoencoder reconstruction, diffusion sample, anomaly map, ground truth.

While scoring, each image's raw panels ``input | autoencoder | sample`` are saved (PNG, image size).
At evaluation they become a finished strip (matplotlib, 256 pixels per panel): titled columns
input, autoencoder, reconstruction, anomaly map, overlay, ground truth (or the decision mask of an
unlabelled run), the image score (and decision) in the title, and one colour bar. The anomaly map is
scaled by one range per class (its 0.1st..99.9th percentile), so maps of one class are comparable and
nothing overflows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from utils.io import atomic_open
from vlmdiff.data.common import IMAGENET_MEAN as _MEAN  # no torchvision: evaluation needs none
from vlmdiff.data.common import IMAGENET_STD as _STD
from vlmdiff.evaluation.run_folder import visual_name, visual_path

IMAGENET_MEAN = torch.tensor(_MEAN).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor(_STD).view(1, 3, 1, 1)
CMAP = "jet"
MAP_COLUMN = "anomaly map"
PANEL_SIZE = 256  # pixels per panel of a finished strip


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised (B,3,H,W) -> (B,H,W,3) uint8, clipped to the displayable range."""
    x = x.detach().float().cpu() * IMAGENET_STD + IMAGENET_MEAN
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_png(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG", compress_level=1)  # fast; the files are ~30% larger


def write_strips(
    folder: Path,
    ids: list[str],
    class_names: list[str],
    image: torch.Tensor,
    autoencoder: torch.Tensor,
    sample: torch.Tensor,
) -> None:
    """One ``input | autoencoder | sample`` strip per image under ``folder/{class}/``."""
    panels = [to_uint8_images(t) for t in (image, autoencoder, sample)]
    for i, (image_id, cls) in enumerate(zip(ids, class_names, strict=True)):
        save_png(folder / visual_path(cls, image_id), np.concatenate([p[i] for p in panels], axis=1))


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H,W) -> matplotlib's 'jet' colours (H,W,3) uint8 (the colour bar of the strips)."""
    rgba = matplotlib.colormaps[CMAP](np.clip(values, 0.0, 1.0), bytes=True)
    return rgba[..., :3]


SAMPLE_IMAGES = 2048  # images of a class whose maps set its display range (every k-th beyond that)


def class_range(maps: np.ndarray) -> tuple[float, float]:
    """The display range of a class's maps: 0.1st and 99.9th percentile (robust to single hot pixels).

    Taken over every 4th pixel of each row and column (a 1/16 sample: the same range to the eye, and
    16 times less work on a class of thousands of maps); :class:`DisplaySample` gathers the same sample
    chunk by chunk.
    """
    sample = DisplaySample(len(maps))
    sample.add(maps)
    return sample.range()


class DisplaySample:
    """The sample of a class's maps that :func:`class_range` reads, gathered chunk by chunk in bounded memory.

    Every 4th pixel of each row and column of every image, or of every k-th image when the class has more
    than ``max_images`` (so at most ``max_images`` x (H/4) x (W/4) values are held).
    """

    def __init__(self, n_images: int, max_images: int = SAMPLE_IMAGES) -> None:
        self.step = max(1, -(-n_images // max_images))
        self.seen = 0
        self.parts: list[np.ndarray] = []

    def add(self, maps: np.ndarray) -> None:
        first = (-self.seen) % self.step  # the first image of this chunk whose index is a multiple of step
        self.parts.append(np.asarray(maps[first :: self.step, ::4, ::4], np.float32).ravel())
        self.seen += len(maps)

    def range(self) -> tuple[float, float]:
        lo, hi = np.percentile(np.concatenate(self.parts), [0.1, 99.9])
        return float(lo), float(max(hi, lo + 1e-12))


class StripFigure:
    """One matplotlib figure reused for every strip of a class: a titled column per panel, one colour bar.

    ``columns`` name the panels in order; the column named ``MAP_COLUMN`` shows a raw anomaly map in
    the class's ``display_range`` (the same normalisation for every image of the class), the others
    show uint8 RGB images or 0..255 masks. Each panel is ``size`` pixels wide and high.
    """

    def __init__(self, columns: Sequence[str], display_range: tuple[float, float], size: int = PANEL_SIZE) -> None:
        self.columns = list(columns)
        self.size = size
        dpi, gap, top, bottom, bar = 100, 8, 52, 6, 70
        n = len(self.columns)
        width = n * size + (n - 1) * gap + 2 * gap + bar
        height = size + top + bottom
        self.fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        FigureCanvasAgg(self.fig)
        self.axes = []
        for i, name in enumerate(self.columns):
            ax = self.fig.add_axes(((gap + i * (size + gap)) / width, bottom / height, size / width, size / height))
            ax.set_axis_off()
            ax.set_title(name, fontsize=10, pad=3)
            self.axes.append(ax)
        self.norm = Normalize(*display_range)
        self.bar_ax = self.fig.add_axes(((width - bar + 4) / width, bottom / height, 12 / width, size / height))
        self.fig.colorbar(ScalarMappable(self.norm, CMAP), cax=self.bar_ax)
        self.bar_ax.tick_params(labelsize=7)
        self.title = self.fig.suptitle("", fontsize=10, y=1 - 6 / height, va="top")
        self.images: list = []

    def render(self, path: Path, panels: Sequence[np.ndarray], title: str, color: str = "black") -> None:
        """Draw ``panels`` (one per column) under ``title`` and save the strip PNG at ``path`` (atomically)."""
        if len(panels) != len(self.columns):
            raise ValueError(f"{len(panels)} panels for {len(self.columns)} columns")
        for i, (ax, name, panel) in enumerate(zip(self.axes, self.columns, panels, strict=True)):
            if len(self.images) <= i:
                kw = (
                    {"cmap": CMAP, "norm": self.norm}
                    if name == MAP_COLUMN
                    else {"cmap": "gray", "vmin": 0, "vmax": 255}
                )
                self.images.append(ax.imshow(panel, interpolation="nearest", **kw))
            else:
                self.images[i].set_data(panel)
        self.title.set_text(title)
        self.title.set_color(color)
        with atomic_open(path, "wb") as f:
            self.fig.savefig(f, format="png", pil_kwargs={"compress_level": 1})


def overlay(image: np.ndarray, amap: np.ndarray, display_range: tuple[float, float]) -> np.ndarray:
    """Half input, half colour-mapped anomaly map (H,W,3) uint8, the map scaled by the class's range."""
    lo, hi = display_range
    heat = colormap((amap.astype(np.float32) - lo) / (hi - lo))
    return (0.5 * image + 0.5 * heat).astype(np.uint8)


def strip_columns(truth: str | None) -> list[str]:
    """Column titles of a finished strip; ``truth`` names the last column (None: no last column)."""
    return ["input", "autoencoder", "reconstruction", MAP_COLUMN, "overlay", *([truth] if truth else [])]


def finish_class(
    panels_dir: Path,
    folder: Path,
    class_name: str,
    chunks: Iterable[dict[str, np.ndarray]],
    display_range: tuple[float, float],
    scores: Mapping[str, float],
    decisions: dict[str, Any] | None = None,
    labelled: bool = True,
) -> int:
    """Render the finished strip of every image of one class that has raw panels; returns how many.

    ``chunks``: the class's images, ``{"ids", "maps", "masks"}`` a chunk (read one at a time);
    ``scores``: image id -> image score. ``panels_dir/{class}/{name}.png`` holds the
    ``input | autoencoder | sample`` panels written while scoring (:func:`write_strips`); the finished
    strip in ``folder/{class}/{name}.png`` adds the map, the overlay and the ground truth (``labelled``
    data) or, with ``decisions`` (``{"image": {id: anomalous}, "image_threshold": t, "pixel_threshold": t
    or None}``), the decision mask ``map >= t`` and the decision in the title.
    """
    truth = "ground truth" if decisions is None and labelled else None
    if decisions is not None and decisions.get("pixel_threshold") is not None:
        truth = f"map >= {decisions['pixel_threshold']:.4g}"
    strip = StripFigure(strip_columns(truth), display_range)
    done = 0
    for chunk in chunks:
        for image_id, amap, mask in zip(chunk["ids"].tolist(), chunk["maps"], chunk["masks"], strict=True):
            rel = visual_path(class_name, str(image_id))
            raw_path = panels_dir / rel
            if not raw_path.is_file():
                continue
            raw = np.asarray(Image.open(raw_path).convert("RGB"))
            h = raw.shape[0]
            inp, ae, rec = raw[:, :h], raw[:, h : 2 * h], raw[:, 2 * h : 3 * h]
            panels = [inp, ae, rec, amap.astype(np.float32), overlay(inp, amap, display_range)]
            score = scores[str(image_id)]
            title, color = f"{image_id}  ({class_name})   image score {score:.4g}", "black"
            if decisions is not None:
                anomalous = bool(decisions["image"][str(image_id)])
                title += (
                    f"   -> {'ANOMALOUS' if anomalous else 'normal'} (threshold {decisions['image_threshold']:.4g})"
                )
                color = "tab:red" if anomalous else "tab:green"
                if truth:
                    panels.append(((amap >= decisions["pixel_threshold"]) * 255).astype(np.uint8))
            elif truth:
                panels.append(mask)
            strip.render(folder / rel, panels, title, color)
            done += 1
    return done


def write_upstream_visuals(
    folder: Path,
    ids: list[str],
    image: torch.Tensor,
    autoencoder: torch.Tensor,
    sample: torch.Tensor,
    maps: torch.Tensor,
) -> None:
    """Upstream's per-image files, for users who compare with its ``log_image_{exp_name}/`` folder.

    For each image ``{name}`` (its id with path separators as ``__``): ``{name}-input.jpg``,
    ``{name}-reconstruction.jpg`` (autoencoder only), ``{name}-samples.jpg`` (diffusion sample),
    ``{name}-features.jpg`` (the anomaly map, min-max normalised per image, grey levels) and
    ``{name}-heatmap.png``: the map min-max normalised per image, OpenCV's JET colours, blended
    0.5/0.5 with the input (upstream's overlay). ``image``/``autoencoder``/``sample``: (B, 3, H, W)
    ImageNet-normalised; ``maps``: (B, H, W).
    """
    import cv2

    panels = {
        k: to_uint8_images(t) for k, t in (("input", image), ("reconstruction", autoencoder), ("samples", sample))
    }
    for i, image_id in enumerate(ids):
        stem = Path(visual_name(image_id)).stem
        for kind, arrays in panels.items():
            _save_jpeg(folder / f"{stem}-{kind}.jpg", arrays[i])
        amap = maps[i].detach().float().cpu().numpy()  # (H, W)
        grey = (255 * (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-12)).astype(np.uint8)
        _save_jpeg(folder / f"{stem}-features.jpg", np.repeat(grey[..., None], 3, axis=-1))
        jet = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)  # (H, W, 3)
        blended = (0.5 * panels["input"][i].astype(np.float32) + 0.5 * jet.astype(np.float32)).astype(np.uint8)
        save_png(folder / f"{stem}-heatmap.png", blended)


def _save_jpeg(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format="JPEG", quality=95)
