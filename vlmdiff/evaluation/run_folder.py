"""The paths inside a test run folder: every file and folder test.py and the evaluation write there is named here.

A run folder (``test.py --output_dir``) holds::

    manifest.json            what the maps depend on (vlmdiff.evaluation.run_inputs)
    maps/{class}/{chunk}.npz per-image anomaly maps, masks, labels, image scores (vlmdiff.evaluation.map_store)
    panels/{class}/*.png     with --save_visuals: input | autoencoder | sample, written while scoring
    visuals/{class}/*.png    with --save_visuals: the finished, titled strips (vlmdiff.evaluation.visuals)
    log_image_{exp_name}/    with --save_visuals: upstream's per-image files
    metrics.json / .csv / .md, curves.json, thresholds.json   (labelled data)
    scores.csv               one row per image: label, score, paths (and decision with --threshold_from)
    masks/{class}/*.png      with --threshold_from: map >= the pixel threshold
    report.html, report/     the report page and its figures and gallery pictures (vlmdiff.evaluation.report_page)

and, while a job writes into it, its lock file (utils.lock).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


def visual_name(image_id: str) -> str:
    """A file name for an image id: path separators become '__'; a PNG keeps its name, any other file gets
    ``.png`` appended to its whole name (``a.jpg`` -> ``a.jpg.png``), so ``a.png`` and ``a.jpg`` stay apart."""
    flat = image_id.replace("/", "__").replace("\\", "__")
    return flat if flat.lower().endswith(".png") else f"{flat}.png"


def visual_path(class_name: str, image_id: str) -> Path:
    """Where an image's strip lies below a run's ``visuals/`` (and its mask below ``masks/``): ``{class}/{name}``."""
    return Path(_safe(class_name)) / visual_name(image_id)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"


@dataclass(frozen=True)
class RunFolder:
    """One run folder; its properties are the paths of the files and folders listed in the module docstring."""

    root: Path

    MANIFEST: ClassVar[str] = "manifest.json"
    METRICS: ClassVar[str] = "metrics.json"
    SCORES: ClassVar[str] = "scores.csv"
    THRESHOLDS: ClassVar[str] = "thresholds.json"
    REPORT: ClassVar[str] = "report.html"

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:  # a RunFolder goes wherever its folder's path does
        return str(self.root)

    # files
    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def metrics_json(self) -> Path:
        return self.root / self.METRICS

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def metrics_md(self) -> Path:
        return self.root / "metrics.md"

    @property
    def curves(self) -> Path:
        return self.root / "curves.json"

    @property
    def thresholds(self) -> Path:
        return self.root / self.THRESHOLDS

    @property
    def scores(self) -> Path:
        return self.root / self.SCORES

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    # folders
    @property
    def maps(self) -> Path:
        return self.root / "maps"

    @property
    def panels(self) -> Path:
        return self.root / "panels"

    @property
    def visuals(self) -> Path:
        return self.root / "visuals"

    @property
    def masks(self) -> Path:
        return self.root / "masks"

    @property
    def report_assets(self) -> Path:
        return self.root / "report"

    def log_images(self, exp_name: str) -> Path:
        """Upstream's per-image files of experiment ``exp_name``."""
        return self.root / f"log_image_{exp_name}"

    # one image's files
    def visual(self, class_name: str, image_id: str) -> Path:
        """The finished strip of an image."""
        return self.visuals / visual_path(class_name, image_id)

    def mask(self, class_name: str, image_id: str) -> Path:
        """The binary mask PNG of an image (``--threshold_from``)."""
        return self.masks / visual_path(class_name, image_id)

    def gallery_picture(self, class_name: str, image_id: str) -> Path:
        """The report's picture of a gallery image drawn from its stored map."""
        return self.report_assets / "gallery" / visual_path(class_name, image_id).with_suffix(".jpg")

    def curves_figure(self, name: str) -> Path:
        """The report's curve figure ``name`` (a class, or "mean")."""
        return self.report_assets / "curves" / visual_name(name)

    # paths as scores.csv and report.html record them
    def relative(self, path: Path) -> str:
        """``path`` (inside the folder) relative to it, with '/' separators."""
        return path.relative_to(self.root).as_posix()

    def resolve(self, relative: str) -> Path:
        """The file that a relative path recorded in the folder (scores.csv, report.html) names."""
        return self.root / relative
