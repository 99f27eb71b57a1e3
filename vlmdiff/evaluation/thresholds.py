"""Decision thresholds: recorded by a labelled run, applied to the images of an unlabelled one.

A labelled run writes ``thresholds.json``: per class and overall, the image score and the pixel score
at which F1 is largest (anomalous = score >= threshold), with the image pooling and what the scores
depend on (checkpoint, reconstruction, feature extractor, smoothing). ``test.py --data_set folder
--threshold_from RUN`` reads it back: scores are only comparable when those are the same, so any
difference is refused. An image of a class the labelled run knows gets that class's thresholds,
any other image the overall ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ldm.checkpoint import DIGEST_KEY
from utils.errors import UserError
from utils.io import read_json, write_json
from vlmdiff.evaluation.run_folder import RunFolder

THRESHOLDS = RunFolder.THRESHOLDS
_SCORES_DEPEND_ON = ("checkpoint", "reconstruction", "feature_extractor", "sigma", "precision")


def _comparable(value: Any) -> Any:
    """``value`` without file locations (``path`` keys): a moved checkpoint still gives the same scores."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k != "path"}
    return value


def thresholds_record(
    curves: dict[str, dict[str, Any]],
    image_overall: float | None,
    pixel_overall: float | None,
    pooling: str,
    manifest: dict[str, Any],
) -> dict[str, Any]:
    """The ``thresholds.json`` record from the class curves of a run (see :mod:`plots`)."""

    def per_class(kind: str) -> dict[str, float]:
        return {cls: c[kind]["f1max_threshold"] for cls, c in curves.items() if c.get(kind)}

    return {
        "rule": "F1-max (anomalous = score >= threshold)",
        "image_pooling": pooling,
        "image": {"overall": image_overall, "per_class": per_class("image")},
        "pixel": {"overall": pixel_overall, "per_class": per_class("pixel")},
        "scores_depend_on": {k: _comparable(manifest.get(k)) for k in _SCORES_DEPEND_ON},
    }


def write_thresholds(run: RunFolder, record: dict[str, Any]) -> Path:
    write_json(run.thresholds, record)
    return run.thresholds


def load_thresholds(run: str | Path, pooling: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The thresholds of the labelled run ``run``, checked against this run's ``manifest`` and ``pooling``."""
    run = Path(run)
    path = RunFolder(run).thresholds if run.is_dir() else run
    if not path.is_file():
        raise UserError(
            f"--threshold_from {run}: no {THRESHOLDS} there; evaluate a labelled test run first "
            "(test.py on mvtec/visa/... writes it)"
        )
    record = read_json(path)
    if record.get("image_pooling") != pooling:
        raise UserError(
            f"--threshold_from {path}: thresholds are for --image_pooling {record.get('image_pooling')}, "
            f"this run uses {pooling}; use the same pooling"
        )
    theirs = record.get("scores_depend_on", {})
    ckpt_then, ckpt_now = theirs.get("checkpoint") or {}, manifest.get("checkpoint") or {}
    if ckpt_then and DIGEST_KEY not in ckpt_then:
        raise UserError(
            f"--threshold_from {path}: written by an older version of test.py, which identified the checkpoint "
            "by its size and first and last MiB only; evaluate that labelled run again with this version "
            "(score it into a new --output_dir)"
        )
    if ckpt_then.get(DIGEST_KEY) != ckpt_now.get(DIGEST_KEY):
        raise UserError(
            f"--threshold_from {path}: those thresholds were made with other weights than {ckpt_now.get('path')} "
            f"(weights sha256 {str(ckpt_then.get(DIGEST_KEY))[:12]}... there, {str(ckpt_now.get(DIGEST_KEY))[:12]}"
            "... here), so the scores are not comparable; test both with the same checkpoint"
        )
    for key in _SCORES_DEPEND_ON:
        if key != "checkpoint" and theirs.get(key) != _comparable(manifest.get(key)):  # checkpoint: its digest
            raise UserError(
                f"--threshold_from {path}: that run's {key} differs from this run's, so its scores "
                f"are not comparable; test both with the same checkpoint and settings"
            )
    if record["image"]["overall"] is None:
        raise UserError(f"--threshold_from {path}: that run has no anomalous image, so no threshold")
    return record


def class_thresholds(record: dict[str, Any], class_name: str) -> tuple[float, float | None]:
    """``(image threshold, pixel threshold or None)`` for ``class_name``: its own, else the overall ones."""
    image = record["image"]["per_class"].get(class_name, record["image"]["overall"])
    pixel = record["pixel"]["per_class"].get(class_name, record["pixel"]["overall"])
    return float(image), None if pixel is None else float(pixel)


def decide(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Anomalous (True) where ``scores >= threshold``."""
    return np.asarray(scores) >= threshold
