"""The in-memory exact metrics (and curve points) that the streamed evaluation of :mod:`metrics` replaced.

Kept verbatim (apart from imports, and the rows built from the metric table) as the oracle of
tests/vlmdiff/evaluation/test_metrics_streaming.py and as the baseline
that bench/bench_eval.py times in the same run: it holds a whole class in memory (its GT-negative scores
sorted, about 13 bytes per pixel), which is what the streamed evaluation avoids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from utils.errors import UserError
from vlmdiff import scoring
from vlmdiff.evaluation.curves import thin
from vlmdiff.evaluation.metric_table import legacy_row, official_row
from vlmdiff.evaluation.metrics import FPR_LIMIT, LEGACY_NUM_THRESHOLDS, _protocols, _to_numpy, binarize_masks

logger = logging.getLogger(__name__)
_BATCH = 64


def _check_maps(maps: Any, where: str) -> np.ndarray:
    """Maps as a numpy float16, float32 or float64 array ``(N, H, W)`` with finite values.

    float16 is kept (half the memory of a class); consumers widen it batch by batch, exactly.
    """
    m = _to_numpy(maps)
    if m.ndim != 3:
        raise UserError(f"{where}: maps must have shape (N, H, W), got {m.shape}")
    if not np.issubdtype(m.dtype, np.floating):
        raise UserError(f"{where}: maps must be floating point, got {m.dtype}")
    if m.dtype not in (np.float16, np.float32, np.float64):
        m = m.astype(np.float64)
    for a in range(0, len(m), _BATCH):
        if not np.isfinite(m[a : a + _BATCH]).all():
            raise UserError(
                f"{where}: maps contain NaN or infinite values (image {a}..{a + _BATCH - 1}); "
                "fix the scoring run that produced them"
            )
    return m


def _image_scores(maps: np.ndarray, pooling: str) -> np.ndarray:
    """``(N,)`` float64 image scores via :func:`vlmdiff.scoring.image_score`, in batches."""
    out = [
        scoring.image_score(torch.from_numpy(np.ascontiguousarray(maps[a : a + _BATCH])), pooling).numpy()
        for a in range(0, len(maps), _BATCH)
    ]
    return np.concatenate(out)


def _gt_regions(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Region of every ground-truth pixel and the area of every region of a class.

    Regions are the 8-connected components of each image's ground truth (never across images),
    numbered from 0 over the whole class. Returns ``(ids, areas)``: ``ids`` int64 for the GT
    pixels in C order (the order of ``x[gt]``), ``areas`` int64 ``(num_regions,)``.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 3x3 neighbourhood inside an image only
    ids, areas, offset = [], [], 0
    for a in range(0, len(gt), _BATCH):
        g = gt[a : a + _BATCH]
        if not g.any():
            continue
        lab, n = ndimage.label(g, structure=structure)  # (b, H, W), 1..n
        r = lab[g].astype(np.int64) - 1
        areas.append(np.bincount(r, minlength=n))
        ids.append(r + offset)
        offset += n
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids), np.concatenate(areas)


def _split_scores(maps: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(scores of GT-negative pixels, scores of GT pixels in C order)``, batch by batch.

    float16 is widened to float32 (exactly); float32 and float64 are kept.
    """
    dtype = np.float64 if maps.dtype == np.float64 else np.float32
    n_pos = int(np.count_nonzero(gt))
    neg, pos = np.empty(gt.size - n_pos, dtype), np.empty(n_pos, dtype)
    i = j = 0
    for a in range(0, len(gt), _BATCH):
        s, g = maps[a : a + _BATCH], gt[a : a + _BATCH]
        p = s[g]
        pos[j : j + len(p)] = p
        j += len(p)
        q = s[~g]
        neg[i : i + len(q)] = q
        i += len(q)
    return neg, pos


def _curve_metrics(
    neg_sorted: np.ndarray,
    pos: np.ndarray,
    weights: np.ndarray | None,
    fpr_limit: float | None,
    keep_curves: bool = False,
) -> dict[str, Any]:
    """AUROC, AP, F1-max and (with ``weights``) AU-PRO from sorted negatives and the positives.

    Every distinct score is a threshold and a pixel is positive if score >= threshold (as in
    scikit-learn's ``_binary_clf_curve`` and MVTec's ``compute_pro``). Between two distinct
    positive scores only FPR changes, so the ROC and PRO curves are exact with two points per
    distinct positive score ``v``: just above ``v`` (negatives > v) and at ``v`` (negatives >=
    v, positives >= v); the omitted points lie on horizontal segments, which change neither a
    trapezoid area nor a linear interpolation, nor AP (recall does not change) nor F1-max (the
    first point of a horizontal run is the best). Counts are exact int64 (AUROC is summed in
    integers); ``weights[k]`` = 1 / (num_regions * area of the region of GT pixel k), so their
    cumulative sum is the PRO. AP = sum (R_n - R_{n-1}) P_n (scikit-learn's definition),
    F1 = 2 TP / (TP + FP + P). Needs a positive; without negatives every metric is NaN (undefined:
    AP and F1-max would be a trivial 1.0 that says nothing about the scores).

    With ``keep_curves`` the result also holds ``"curves"``: the exact curve points (``tp``, ``fp``
    interleaved as above, ``pro`` with its (1, 1) end point, the counts ``tp_at``/``fp_at`` at each
    distinct positive score ``thresholds``, descending, and ``n_pos``/``n_neg``) and
    ``"f1max_threshold"``: the score at which F1 is largest (positive = score >= it).
    """
    n_pos, n_neg = len(pos), len(neg_sorted)
    order = np.argsort(pos)[::-1]
    ps = pos[order]  # descending
    last = np.flatnonzero(np.append(ps[:-1] != ps[1:], True))  # last index of each tie group
    v = ps[last]  # distinct positive scores, descending
    tp_at = last + 1
    tp_above = np.concatenate(([0], tp_at[:-1]))
    fp_at = n_neg - np.searchsorted(neg_sorted, v, side="left")  # negatives >= v
    fp_above = n_neg - np.searchsorted(neg_sorted, v, side="right")  # negatives > v
    tp = np.concatenate(([0], np.stack([tp_above, tp_at], 1).ravel(), [n_pos]))
    fp = np.concatenate(([0], np.stack([fp_above, fp_at], 1).ravel(), [n_neg]))
    if n_neg == 0:  # undefined: AP and F1-max would be a trivial 1.0
        out = {"auroc": math.nan, "ap": math.nan, "f1max": math.nan}
    else:
        out = {
            "auroc": int(np.sum((tp[1:] + tp[:-1]) * np.diff(fp))) / (2.0 * n_pos * n_neg),
            "ap": float(np.sum((tp_at - tp_above) * (tp_at / (tp_at + fp_at)))) / n_pos,
            "f1max": float(np.max(2.0 * tp_at / (tp_at + fp_at + n_pos))),
        }
    pro = None
    if weights is not None and fpr_limit is not None and n_neg == 0:
        out["aupro"] = math.nan
    elif weights is not None and fpr_limit is not None:
        w_at = np.cumsum(weights[order])[last]
        w_above = np.concatenate(([0.0], w_at[:-1]))
        pro = np.concatenate(([0.0], np.stack([w_above, w_at], 1).ravel(), [w_at[-1], 1.0]))
        fpr = np.concatenate((fp / n_neg, [1.0]))  # MVTec's (1, 1) end point
        out["aupro"] = float(_trapezoid(fpr, pro, fpr_limit) / fpr_limit)
    if keep_curves:
        f1 = 2.0 * tp_at / (tp_at + fp_at + n_pos)
        out["f1max_threshold"] = float(v[int(np.argmax(f1))])
        out["curves"] = {
            "tp": tp,
            "fp": fp,
            "tp_at": tp_at,
            "fp_at": fp_at,
            "thresholds": v,
            "n_pos": n_pos,
            "n_neg": n_neg,
            "pro": pro,
        }
    return out


def _trapezoid(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the polyline ``(x, y)`` (x non-decreasing) from ``x[0]`` to ``x = limit``.

    As MVTec AD's ``trapezoid``: the segment that crosses ``limit`` is cut there with y
    interpolated linearly; if ``limit`` is a vertex, points beyond it are ignored.
    """
    seg = 0.5 * (y[1:] + y[:-1]) * np.diff(x)
    over = np.flatnonzero(x[1:] > limit)
    if over.size == 0:
        return float(np.sum(seg))
    j = int(over[0])  # first segment that ends beyond the limit
    area = float(np.sum(seg[:j]))
    if x[j] < limit:
        y_lim = y[j] + (y[j + 1] - y[j]) * (limit - x[j]) / (x[j + 1] - x[j])
        area += 0.5 * (y_lim + y[j]) * (limit - x[j])
    return area


def ranking_metrics(scores: Any, labels: Any, keep_curves: bool = False) -> dict[str, Any]:
    """AUROC, AP and F1-max of 1-D ``scores`` against binary ``labels`` (equal to scikit-learn).

    All three are NaN (undefined) unless both labels occur.
    ``keep_curves``: also the curve points and the F1-max threshold (see :func:`_curve_metrics`).
    """
    s = np.asarray(_to_numpy(scores), dtype=np.float64).ravel()
    y = np.asarray(_to_numpy(labels)).ravel().astype(bool)
    if not y.any():
        return {"auroc": math.nan, "ap": math.nan, "f1max": math.nan}
    return _curve_metrics(np.sort(s[~y]), s[y], None, None, keep_curves)


def pixel_metrics(maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT, keep_curves: bool = False) -> dict[str, Any]:
    """Pixel AUROC, AP, F1-max and the exact AU-PRO of one class, with one sort of its pixels.

    Args:
        maps: ``(N, H, W)`` float scores of every image of the class.
        gt: ``(N, H, W)`` bool ground truth.
        fpr_limit: upper FPR limit of the AU-PRO integral (0.3 in the paper), in (0, 1].

    AU-PRO follows the MVTec AD evaluation: 8-connected GT components per image, every distinct
    score a threshold, PRO = overlap averaged over all components of the class, FPR over every
    GT-negative pixel of the class, (0, 0) and (1, 1) end points, trapezoid up to ``fpr_limit``
    (PRO interpolated there), divided by ``fpr_limit``. Only the GT-negative scores are sorted
    (a float32 copy, 4 bytes per pixel; float64 maps: 8); the GT pixels are argsorted. NaN
    (all four) where undefined: no GT-positive or no GT-negative pixel. ``keep_curves``: also the curve
    points and the F1-max threshold (see :func:`_curve_metrics`).
    """
    m = _check_maps(maps, "pixel_metrics")
    if gt.shape != m.shape:
        raise UserError(f"maps {m.shape} and ground truth {gt.shape} differ in shape")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    neg, pos = _split_scores(m, gt)
    if len(pos) == 0:
        return {"auroc": math.nan, "ap": math.nan, "f1max": math.nan, "aupro": math.nan}
    ids, areas = _gt_regions(gt)
    weights = 1.0 / (len(areas) * areas.astype(np.float64))[ids]
    neg.sort()
    return _curve_metrics(neg, pos, weights, fpr_limit, keep_curves)


def legacy_aupro(maps: Any, gt: np.ndarray, num_thresholds: int = LEGACY_NUM_THRESHOLDS) -> float:
    """AU-PRO as the DiAD/VLMDiff metric code computes it (the "legacy" protocol).

    Thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` over all maps of the class; a
    pixel is positive if its score > threshold; PRO = mean over the class's 8-connected GT
    regions of (positive pixels in region) / (region area); FPR = positive GT-negative pixels /
    all GT-negative pixels; rows with FPR < 0.3 are kept, their FPR divided by the largest kept
    FPR, and the area computed as ``sklearn.metrics.auc`` does (trapezoid; FPR decreases along
    the rows). A plain loop over the thresholds (one full pass over the pixels each). NaN where
    undefined.
    """
    m = _check_maps(maps, "legacy_aupro")
    if gt.shape != m.shape:
        raise UserError(f"maps {m.shape} and ground truth {gt.shape} differ in shape")
    if m.dtype == np.float16:
        m = m.astype(np.float32)  # exact; numpy compares float16 slowly
    lo, hi = np.float64(m.min()), np.float64(m.max())
    flat = m.ravel()
    pos_reg, areas = _gt_regions(gt)
    n_neg = flat.size - len(pos_reg)
    if len(areas) == 0 or n_neg == 0 or hi == lo:
        if hi == lo and len(areas) and n_neg:
            logger.warning("legacy AU-PRO undefined: every score of the class is %s", hi)
        return math.nan
    pos_scores = m[gt]  # C order, like pos_reg
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / num_thresholds):
        above_pos = pos_scores > th
        fp = np.count_nonzero(flat > th) - np.count_nonzero(above_pos)
        overlap = np.bincount(pos_reg, weights=above_pos, minlength=len(areas))
        pros.append(float(np.mean(overlap / areas)))
        fprs.append(fp / n_neg)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < FPR_LIMIT
    if keep.sum() < 2 or fprs[keep].max() == 0:
        logger.warning("legacy AU-PRO undefined: fewer than two thresholds with 0 < FPR < 0.3")
        return math.nan
    x, y = fprs[keep] / fprs[keep].max(), pros[keep]  # FPR falls as the threshold rises
    return float(-np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))  # sklearn.metrics.auc of a decreasing x


def evaluate_class(
    name: str,
    maps: Any,
    masks: Any,
    protocol: str,
    image_pooling: str,
    mask_threshold: float,
    on_curves: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_class`; ``on_curves(name, curves)`` also receives the class's curves from the same
    sorts, ``{"image": ranking_metrics(..., keep_curves=True), "pixel": pixel_metrics(..., keep_curves=True),
    "image_scores": (N,), "labels": (N,) bool}``, before the legacy AU-PRO (so they are freed by then).
    """
    keep_curves = on_curves is not None
    protocols = _protocols(protocol)
    m = _check_maps(maps, f"class {name!r}")
    if len(m) == 0:
        raise UserError(f"class {name!r} has no images; drop it or fix the class names")
    gt = binarize_masks(masks, mask_threshold)
    if gt.shape != m.shape:
        raise UserError(f"class {name!r}: maps {m.shape} and masks {gt.shape} differ in shape")
    labels = gt.reshape(len(gt), -1).any(axis=1)
    scores = _image_scores(m, image_pooling)
    img = ranking_metrics(scores, labels, keep_curves)
    pix = pixel_metrics(m, gt, keep_curves=keep_curves)
    official = official_row({"image": img, "pixel": pix})
    undefined = [k for k, v in official.items() if math.isnan(v)]
    if undefined:
        logger.warning(
            "class %r: %s undefined (NaN): %d of %d images anomalous, %d of %d pixels anomalous",
            name,
            ", ".join(undefined),
            int(labels.sum()),
            len(labels),
            int(gt.sum()),
            gt.size,
        )
    if on_curves is not None:
        on_curves(name, {"image": img, "pixel": pix, "image_scores": scores, "labels": labels})
        img.pop("curves", None)
        pix.pop("curves", None)
    out: dict[str, dict[str, float]] = {}
    if "official" in protocols:
        out["official"] = official
    if "legacy" in protocols:
        out["legacy"] = legacy_row(official, {"legacy_aupro": legacy_aupro(m, gt)})
    return out


# The report's curve points as they were made from the curves above (vlmdiff/evaluation/plots.py before streaming;
# thin() itself is unchanged and lives in vlmdiff.evaluation.curves).
def _list(a: np.ndarray, digits: int | None = 7) -> list[float]:
    """Plain floats (rounded to ``digits``; None: exact, for thresholds)."""
    return [float(v) if digits is None else round(float(v), digits) for v in a]


def curve_record(res: dict[str, Any], resolution: float, pro: bool) -> dict[str, Any] | None:
    """JSON-able ROC, PR (and PRO) points of one result of ``ranking_metrics``/``pixel_metrics``."""
    c = res.get("curves")
    if c is None:
        return None
    n_pos, n_neg = c["n_pos"], c["n_neg"]
    out: dict[str, Any] = {
        "n_pos": int(n_pos),
        "n_neg": int(n_neg),
        "f1max_threshold": res["f1max_threshold"],
        "auroc": res["auroc"],
        "ap": res["ap"],
        "f1max": res["f1max"],
    }
    if n_neg:
        fpr, tpr = c["fp"] / n_neg, c["tp"] / n_pos
        i = thin(fpr, tpr, resolution)
        out["roc"] = {"fpr": _list(fpr[i]), "tpr": _list(tpr[i])}
    tp_at, fp_at = c["tp_at"], c["fp_at"]
    recall, precision = tp_at / n_pos, tp_at / (tp_at + fp_at)
    best = int(np.argmax(2.0 * tp_at / (tp_at + fp_at + n_pos)))
    i = thin(recall, precision, resolution, keep=[best])
    out["pr"] = {
        "recall": _list(recall[i]),
        "precision": _list(precision[i]),
        "threshold": _list(c["thresholds"][i], None),
        "tp": [int(v) for v in tp_at[i]],
        "fp": [int(v) for v in fp_at[i]],
    }
    if pro and c["pro"] is not None:
        fpr = np.concatenate((c["fp"] / n_neg, [1.0]))
        # the point at the FPR limit itself, so that the area to the limit is the same on the kept points
        y_lim = float(np.interp(FPR_LIMIT, fpr, c["pro"]))
        at = int(np.searchsorted(fpr, FPR_LIMIT, side="right"))
        fpr = np.insert(fpr, at, FPR_LIMIT)
        pro_y = np.insert(c["pro"], at, y_lim)
        i = thin(fpr, pro_y, resolution)
        i = np.union1d(i, [at])
        out["pro"] = {"fpr": _list(fpr[i]), "pro": _list(pro_y[i]), "aupro": res["aupro"], "fpr_limit": FPR_LIMIT}
    return out
