"""Evaluate anomaly maps: the seven paper metrics per class and their mean over classes.

Input: an .npz with arrays ``maps`` (or ``preds``) [N, H, W] float, ``masks`` [N, H, W]
(uint8 0..255, bool, or float 0..1) and ``class_names`` (or ``clsname``) [N] strings.
Output: a table (percent) of image AU-ROC / AP / F1-max, pixel AU-ROC / AP / F1-max and AU-PRO
(FPR limit 0.3) per class plus the mean row, and optionally a JSON file (fractions, NaN as null).

Protocols: "official" (scikit-learn AUROC/AP, F1-max over every threshold, exact MVTec AD AU-PRO;
the default), "legacy" (the DiAD/VLMDiff metric code: AUROCs below 0.5 flipped, 200-threshold
AU-PRO normalised by its largest FPR below 0.3), or "both".
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from utils.cli import HelpFormatter, run_main, setup_logging
from utils.errors import UserError
from utils.io import write_json
from vlmdiff import scoring

logger = logging.getLogger(__name__)

METRICS = ("auroc_image", "ap_image", "f1max_image", "auroc_pixel", "ap_pixel", "f1max_pixel", "aupro")
PROTOCOLS = ("official", "legacy", "both")
FPR_LIMIT = 0.3
LEGACY_NUM_THRESHOLDS = 200
_BATCH = 64  # images per step of labelling, key building and image scoring


# --------------------------------------------------------------------------- input checks
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def binarize_masks(masks: Any, mask_threshold: float = 0.0) -> np.ndarray:
    """Ground truth ``(N, H, W)`` bool from masks in any of the supported encodings.

    ``mask_threshold`` is a fraction of the mask's full scale, so 0 means "any positive value" for
    every encoding: uint8 masks (0..255) give ``mask > 255 * t``; bool, 0/1 integer and float
    masks (0..1) give ``mask > t``. Float masks outside [0, 1] and integer masks other than uint8
    with values outside {0, 1} are refused (ambiguous scale).
    """
    m = _to_numpy(masks)
    if not 0.0 <= mask_threshold < 1.0:
        raise UserError(f"mask_threshold must be in [0, 1) (a fraction of the mask's full scale), got {mask_threshold}")
    if m.dtype == np.bool_:
        return m
    if m.dtype == np.uint8:
        return m > 255.0 * mask_threshold
    if m.size and (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        lo, hi = m.min(), m.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise UserError(
                f"masks of dtype {m.dtype} must lie in [0, 1] (found {lo}..{hi}); "
                "pass 0..255 masks as uint8")
        return m > mask_threshold
    if m.size == 0:
        return m.astype(bool)
    raise UserError(f"masks have unsupported dtype {m.dtype}; use uint8 0..255, bool or float 0..1")


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
        if not np.isfinite(m[a:a + _BATCH]).all():
            raise UserError(f"{where}: maps contain NaN or infinite values (image {a}..{a + _BATCH - 1}); "
                            "fix the scoring run that produced them")
    return m


# --------------------------------------------------------------------------- exact curves
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
        g = gt[a:a + _BATCH]
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
        s, g = maps[a:a + _BATCH], gt[a:a + _BATCH]
        p = s[g]
        pos[j:j + len(p)] = p
        j += len(p)
        q = s[~g]
        neg[i:i + len(q)] = q
        i += len(q)
    return neg, pos


def _curve_metrics(neg_sorted: np.ndarray, pos: np.ndarray, weights: np.ndarray | None,
                   fpr_limit: float | None, keep_curves: bool = False) -> dict[str, Any]:
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
        out["curves"] = {"tp": tp, "fp": fp, "tp_at": tp_at, "fp_at": fp_at, "thresholds": v,
                         "n_pos": n_pos, "n_neg": n_neg,
                         "pro": pro}
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


# --------------------------------------------------------------------------- metric functions
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


def pixel_metrics(maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT, keep_curves: bool = False
                  ) -> dict[str, Any]:
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


def aupro(maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """Exact AU-PRO (MVTec AD definition) up to ``fpr_limit``, normalised by it; see :func:`pixel_metrics`."""
    return pixel_metrics(maps, gt, fpr_limit)["aupro"]


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


# --------------------------------------------------------------------------- evaluation
def _image_scores(maps: np.ndarray, pooling: str) -> np.ndarray:
    """``(N,)`` float64 image scores via :func:`vlmdiff.scoring.image_score`, in batches."""
    out = [scoring.image_score(torch.from_numpy(np.ascontiguousarray(maps[a:a + _BATCH])), pooling).numpy()
           for a in range(0, len(maps), _BATCH)]
    return np.concatenate(out)


def _protocols(protocol: str) -> tuple[str, ...]:
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return ("official", "legacy") if protocol == "both" else (protocol,)


def evaluate_class(name: str, maps: Any, masks: Any, protocol: str = "official", image_pooling: str = "paper",
                   mask_threshold: float = 0.0) -> dict[str, dict[str, float]]:
    """The seven metrics of one class: ``{protocol: {metric: value}}`` (one entry per protocol).

    ``maps`` ``(N, H, W)`` float, ``masks`` ``(N, H, W)`` (see :func:`binarize_masks`). Image
    label = the binarised mask has a positive pixel; image score = :func:`scoring.image_score`.
    Metrics that are undefined for this class (no anomalous image / pixel, no normal image /
    pixel) are NaN and logged as a warning.
    """
    return _evaluate_class(name, maps, masks, protocol, image_pooling, mask_threshold)


def _evaluate_class(name: str, maps: Any, masks: Any, protocol: str, image_pooling: str, mask_threshold: float,
                    on_curves: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, float]]:
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
    official = {"auroc_image": img["auroc"], "ap_image": img["ap"], "f1max_image": img["f1max"],
                "auroc_pixel": pix["auroc"], "ap_pixel": pix["ap"], "f1max_pixel": pix["f1max"],
                "aupro": pix["aupro"]}
    undefined = [k for k, v in official.items() if math.isnan(v)]
    if undefined:
        logger.warning("class %r: %s undefined (NaN): %d of %d images anomalous, %d of %d pixels anomalous",
                       name, ", ".join(undefined), int(labels.sum()), len(labels), int(gt.sum()), gt.size)
    if on_curves is not None:
        on_curves(name, {"image": img, "pixel": pix, "image_scores": scores, "labels": labels})
        img.pop("curves", None)
        pix.pop("curves", None)
    out: dict[str, dict[str, float]] = {}
    if "official" in protocols:
        out["official"] = official
    if "legacy" in protocols:
        flip = {k: (1.0 - v if v < 0.5 else v) for k, v in official.items() if k.startswith("auroc")}
        out["legacy"] = {**official, **flip, "aupro": legacy_aupro(m, gt)}
    return out


def _mean_rows(per_class: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """The mean over the classes where each metric is defined, and how many classes that is per metric."""
    mean, over = {}, {}
    for k in METRICS:
        vals = [row[k] for row in per_class.values()]
        ok = [v for v in vals if not math.isnan(v)]
        if len(ok) < len(vals):
            logger.warning("mean %s is over %d of %d classes (undefined for the others)", k, len(ok), len(vals))
        mean[k] = float(np.mean(ok)) if ok else math.nan
        over[k] = len(ok)
    return mean, over


def evaluate_stream(items: Iterable[tuple[str, Any, Any]], protocol: str = "official", image_pooling: str = "paper",
                    mask_threshold: float = 0.0,
                    on_curves: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate class by class from ``(class_name, maps (N,H,W), masks (N,H,W))`` items.

    Only one class is held at a time, so peak memory is set by the largest class (about 13 bytes
    per pixel for float32 maps, uint8 masks and the official sort, plus the caller's copy).
    Returns ``{"per_class": {cls: {metric: value}}, "mean": {metric: value}, "mean_over": {metric: n}}``
    with fractions as Python floats: NaN where a metric is undefined for a class (no normal or no
    anomalous image / pixel); mean = arithmetic mean over the ``n`` classes where a metric is defined; for
    ``protocol="both"`` ``{"official": <that>, "legacy": <that>}``. Each class may appear once.
    ``on_curves(class_name, curves)`` is called per class with the curve points the metrics were
    computed from (see :func:`_evaluate_class`), so plots need no second pass over the pixels.
    """
    protocols = _protocols(protocol)
    rows: dict[str, dict[str, dict[str, float]]] = {p: {} for p in protocols}
    for name, maps, masks in items:
        name = str(name)
        if name in rows[protocols[0]]:
            raise UserError(f"class {name!r} appears twice in the evaluation stream; pass each class once")
        for p, row in _evaluate_class(name, maps, masks, protocol, image_pooling, mask_threshold, on_curves).items():
            rows[p][name] = {k: float(v) for k, v in row.items()}
        logger.info("evaluated class %s (%d images)", name, len(maps))
    if not rows[protocols[0]]:
        raise UserError("nothing to evaluate: no classes given")
    result = {}
    for p in protocols:
        mean, over = _mean_rows(rows[p])
        result[p] = {"per_class": rows[p], "mean": mean, "mean_over": over}
    return result if protocol == "both" else result[protocol]


def evaluate(maps: Any, masks: Any, class_names: Sequence[str], protocol: str = "official",
             image_pooling: str = "paper", mask_threshold: float = 0.0) -> dict[str, Any]:
    """The seven metrics per class and their mean (see :func:`evaluate_stream` for the result).

    Args:
        maps: ``(N, H, W)`` anomaly maps, numpy or torch, any float dtype (computed in float64).
        masks: ``(N, H, W)`` uint8 0..255, bool, or float 0..1 (see :func:`binarize_masks`).
        class_names: ``N`` class names; classes are reported in order of first appearance.
        protocol: "official", "legacy" or "both".
        image_pooling: "paper", "ader" or "max" (see :func:`scoring.image_score`).
        mask_threshold: ground truth = mask > this fraction of the mask's full scale.
    """
    m, k = _to_numpy(maps), _to_numpy(masks)
    names = np.asarray([str(c) for c in _to_numpy(class_names).ravel()])
    if m.ndim != 3 or m.shape != k.shape or len(names) != len(m):
        raise UserError(f"maps {m.shape}, masks {k.shape} and class_names ({len(names)}) must be "
                        "(N, H, W), (N, H, W) and N")
    _, first = np.unique(names, return_index=True)

    def items() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        for cls in names[np.sort(first)]:
            idx = np.flatnonzero(names == cls)
            if idx[-1] - idx[0] + 1 == len(idx):  # contiguous: views, no copy
                sel: Any = slice(int(idx[0]), int(idx[-1]) + 1)
            else:
                sel = idx
            yield str(cls), m[sel], k[sel]

    return evaluate_stream(items(), protocol, image_pooling, mask_threshold)


# --------------------------------------------------------------------------- reporting
_HEADERS = ("AU-ROC_I", "AP_I", "F1max_I", "AU-ROC_P", "AP_P", "F1max_P", "AU-PRO")

PAPER_RESULTS: dict[str, dict[str, float]] = {  # the VLMDiff paper (WACV 2026), mean over classes
    name: dict(zip(METRICS, (v / 100.0 for v in vals)))
    for name, vals in {
        "realiad": (78.0, 73.2, 69.8, 97.1, 25.5, 32.3, 87.7),
        "coco": (59.1, 51.2, 62.9, 69.0, 15.3, 22.4, 38.8),
        "mvtec": (90.6, 95.7, 94.2, 95.9, 51.8, 53.6, 89.4),
        "visa": (80.9, 83.9, 80.7, 97.0, 28.3, 33.6, 81.0),
    }.items()
}
_DATASET_ALIASES = {"real_iad": "realiad", "mvtec_ad": "mvtec", "coco_ad": "coco"}


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100.0 * v:.1f}"


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """Markdown table of a result of :func:`evaluate` (percent, one decimal; classes, then "mean").

    A ``protocol="both"`` result gives one table per protocol. With ``mean_over`` in the result a last
    row says over how many classes each column's mean is taken; "n/a" marks an undefined metric.
    """
    if "per_class" not in result:
        return "\n\n".join(format_table(sub, f"{title} ({p})" if title else p) for p, sub in result.items())
    lines = [f"### {title}", ""] if title else []
    lines.append("| class | " + " | ".join(_HEADERS) + " |")
    lines.append("|---|" + "---:|" * len(_HEADERS))
    for name, row in [*result["per_class"].items(), ("mean", result["mean"])]:
        lines.append(f"| {name} | " + " | ".join(_pct(row[k]) for k in METRICS) + " |")
    if "mean_over" in result:
        n = len(result["per_class"])
        lines.append("| classes in mean | " + " | ".join(f"{result['mean_over'][k]} of {n}" for k in METRICS) + " |")
    return "\n".join(lines)


def compare_to_paper(mean_row: dict[str, float], dataset: str) -> str:
    """Markdown table of our mean row, the paper's and the difference, in points."""
    return paper_comparison({None: mean_row}, dataset)


def paper_means(by_protocol: dict[str, Any], which: str | None = None) -> dict[str, dict[str, float]]:
    """The mean rows to set beside the paper's: ``{protocol: mean row}``.

    ``which`` None: the paper's protocol (legacy) where the result has it, else the official row (then
    labelled as such); "legacy"/"official": that one; "both": every protocol the result has, legacy first.
    """
    have = [p for p in ("legacy", "official") if p in by_protocol]
    if not have:
        raise UserError(f"no metrics of a known protocol (found: {', '.join(by_protocol) or 'none'})")
    if which == "both":
        chosen = have
    elif which is None:
        chosen = have[:1]
    elif which in have:
        chosen = [which]
    else:
        raise UserError(f"no '{which}' metrics in this run; evaluate it with --metrics_protocol {which} or both")
    return {p: by_protocol[p]["mean"] for p in chosen}


def paper_comparison(means: dict[str | None, dict[str, float]], dataset: str) -> str:
    """Markdown table: our mean row per protocol, the paper's row (legacy protocol) and the differences.

    ``means``: ``{protocol: mean row}`` (a ``None`` key is an unlabelled row "ours"). Every row says
    its protocol; the paper's numbers come from the DiAD/VLMDiff metric code (the legacy protocol), so
    only a legacy row is a like-for-like comparison.
    """
    key = _DATASET_ALIASES.get(dataset, dataset)
    if key not in PAPER_RESULTS:
        raise UserError(f"no published results for dataset {dataset!r}; known: {', '.join(PAPER_RESULTS)}")
    paper = PAPER_RESULTS[key]
    labelled = [p is not None for p in means]
    lines = ["| | " + " | ".join(_HEADERS) + " |", "|---|" + "---:|" * len(_HEADERS)]
    for protocol, row in means.items():
        lines.append(f"| ours{f' ({protocol} protocol)' if protocol else ''} | "
                     + " | ".join(_pct(row[k]) for k in METRICS) + " |")
    lines.append(f"| paper ({key}{', legacy protocol' if any(labelled) else ''}) | "
                 + " | ".join(_pct(paper[k]) for k in METRICS) + " |")
    for protocol, row in means.items():
        diff = {k: row[k] - paper[k] for k in METRICS}
        lines.append(f"| difference{f' ({protocol})' if protocol else ''} | " + " | ".join(
            "n/a" if math.isnan(diff[k]) else f"{100.0 * diff[k]:+.1f}" for k in METRICS) + " |")
    return "\n".join(lines)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and math.isnan(obj) else obj


# --------------------------------------------------------------------------- command line
def load_inputs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(maps, masks, class_names)`` from an .npz with ``maps|preds``, ``masks``, ``class_names|clsname``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {}
            for role, names in (("maps", ("maps", "preds")), ("masks", ("masks",)),
                                ("class_names", ("class_names", "clsname"))):
                found = next((n for n in names if n in data.files), None)
                if found is None:
                    raise UserError(f"{path}: no array {' or '.join(repr(n) for n in names)} "
                                    f"(arrays present: {', '.join(data.files) or 'none'})")
                arrays[role] = data[found]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz of plain arrays ({e}); save it with numpy.savez") from e
    if arrays["maps"].ndim != 3 or arrays["masks"].shape != arrays["maps"].shape:
        raise UserError(f"{path}: maps {arrays['maps'].shape} and masks {arrays['masks'].shape} must both be (N, H, W)")
    if arrays["class_names"].shape != (len(arrays["maps"]),):
        raise UserError(f"{path}: class_names has shape {arrays['class_names'].shape}, "
                        f"expected ({len(arrays['maps'])},)")
    return arrays["maps"], arrays["masks"], arrays["class_names"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmdiff.metrics", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("file", help=".npz with maps (or preds), masks, class_names (or clsname)")
    p.add_argument("--protocol", "--metrics_protocol", choices=PROTOCOLS, default="official",
                   help="official (scikit-learn, MVTec AU-PRO), legacy (upstream's metric code) or both")
    p.add_argument("--image_pooling", choices=scoring.POOLINGS, default="paper",
                   help="image score: paper = max after 8 x avgpool 8; ader = max after avgpool 16; "
                        "max = the map's maximum")
    p.add_argument("--mask_threshold", type=float, default=0.0,
                   help="ground truth = mask > this fraction of full scale (255 for uint8, 1 otherwise)")
    p.add_argument("--output",
                   help="write the metrics (fractions, NaN as null) to this JSON file (default: print only)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate the .npz named on the command line, print the table(s), optionally write JSON."""
    args = parse_args(argv)
    maps, masks, names = load_inputs(args.file)
    try:
        result = evaluate(maps, masks, names, args.protocol, args.image_pooling, args.mask_threshold)
    except UserError as e:
        raise UserError(f"{args.file}: {e}") from e
    print(format_table(result, title=Path(args.file).name))
    if args.output:
        settings = {"input": str(args.file), "protocol": args.protocol, "image_pooling": args.image_pooling,
                    "mask_threshold": args.mask_threshold}
        write_json(args.output, _nan_to_none({"settings": settings, **result}))
    return result


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_main(main))
