"""The metrics of arrays already in memory, one call each: image ranking metrics (AU-ROC, AP, F1-max), the
pixel metrics of one class with the exact AU-PRO, and the legacy protocol's AU-PRO.

Each wraps one class in an :class:`class_scan.ArrayClass` and runs the streamed computation of
:mod:`class_metrics` on it; :mod:`metrics` evaluates whole runs class by class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from utils.errors import UserError
from vlmdiff.evaluation.class_metrics import POSITIVE_BUDGET, pixel_passes, ranking
from vlmdiff.evaluation.class_scan import ArrayClass, _to_numpy, scan
from vlmdiff.evaluation.curves import RESOLUTION

FPR_LIMIT = 0.3


def ranking_metrics(scores: Any, labels: Any, keep_curves: bool = False) -> dict[str, Any]:
    """AUROC, AP and F1-max of 1-D ``scores`` against binary ``labels`` (equal to scikit-learn).

    All three are NaN (undefined) unless both labels occur. ``keep_curves``: also ``"curves"`` (the ROC
    and PR points at :data:`curves.RESOLUTION`) and ``"f1max_threshold"`` (positive = score >= it).
    """
    s = np.asarray(_to_numpy(scores), dtype=np.float64).ravel()
    y = np.asarray(_to_numpy(labels)).ravel().astype(bool)
    return ranking(s, y, RESOLUTION if keep_curves else None)


def pixel_metrics(
    maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT, keep_curves: bool = False, budget: int = POSITIVE_BUDGET
) -> dict[str, Any]:
    """Pixel AUROC, AP, F1-max and the exact AU-PRO of one class (:mod:`class_metrics`).

    Args:
        maps: ``(N, H, W)`` float scores of every image of the class.
        gt: ``(N, H, W)`` bool ground truth.
        fpr_limit: upper FPR limit of the AU-PRO integral (0.3 in the paper), in (0, 1].
        budget: positive pixels held at once (see :data:`class_metrics.POSITIVE_BUDGET`).

    AU-PRO follows the MVTec AD evaluation: 8-connected GT components per image, every distinct
    score a threshold, PRO = overlap averaged over all components of the class, FPR over every
    GT-negative pixel of the class, (0, 0) and (1, 1) end points, trapezoid up to ``fpr_limit``
    (PRO interpolated there), divided by ``fpr_limit``. NaN (all four) where undefined: no
    GT-positive or no GT-negative pixel. ``keep_curves``: also the curve points and the F1-max
    threshold (see :func:`ranking_metrics`).
    """
    m = _to_numpy(maps)
    if np.shape(gt) != m.shape:
        raise UserError(f"maps {m.shape} and ground truth {np.shape(gt)} differ in shape")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    source = ArrayClass(m, np.asarray(gt, bool))
    s = scan(source, "pixel_metrics", None, 0.0, budget)
    return pixel_passes(
        s,
        source,
        "pixel_metrics",
        0.0,
        budget=budget,
        legacy=False,
        fpr_limit=fpr_limit,
        resolution=RESOLUTION if keep_curves else None,
    )[0]


def aupro(maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """Exact AU-PRO (MVTec AD definition) up to ``fpr_limit``, normalised by it; see :func:`pixel_metrics`."""
    return pixel_metrics(maps, gt, fpr_limit)["aupro"]


def legacy_aupro(maps: Any, gt: np.ndarray) -> float:
    """AU-PRO as the DiAD/VLMDiff metric code computes it (the "legacy" protocol).

    Thresholds ``np.arange(min, max, (max - min) / 200)`` over all maps of the class; a pixel is
    positive if its score > threshold; PRO = mean over the class's 8-connected GT regions of
    (positive pixels in region) / (region area); FPR = positive GT-negative pixels / all GT-negative
    pixels; rows with FPR < 0.3 are kept, their FPR divided by the largest kept FPR, and the area
    computed as ``sklearn.metrics.auc`` does (trapezoid; FPR decreases along the rows). Counted for all
    thresholds in one pass over the pixels (:class:`class_metrics`). NaN where undefined.
    """
    m = _to_numpy(maps)
    if np.shape(gt) != m.shape:
        raise UserError(f"maps {m.shape} and ground truth {np.shape(gt)} differ in shape")
    source = ArrayClass(m, np.asarray(gt, bool))
    s = scan(source, "legacy_aupro", None, 0.0, budget=0)
    return pixel_passes(
        s, source, "legacy_aupro", 0.0, budget=0, legacy=True, fpr_limit=FPR_LIMIT, resolution=None, official=False
    )[1]
