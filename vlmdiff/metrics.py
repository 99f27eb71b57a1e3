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
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage

from utils.cli import run_main, setup_logging
from utils.errors import UserError
from utils.io import write_json
from vlmdiff import scoring

logger = logging.getLogger(__name__)

METRICS = ("auroc_image", "ap_image", "f1max_image", "auroc_pixel", "ap_pixel", "f1max_pixel", "aupro")
PROTOCOLS = ("official", "legacy", "both")
FPR_LIMIT = 0.3
LEGACY_NUM_THRESHOLDS = 200
_CHUNK = 1 << 21  # pixels per step of the sorted sweep (bounds its temporaries to ~100 MB)
_BATCH = 64  # images per step of labelling, key building and image scoring
_STRUCT_2D_IN_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCT_2D_IN_3D[1] = True  # 8-connectivity inside each image, never across images


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
        return m.copy()
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
    """Maps as a numpy float32 or float64 array ``(N, H, W)``; float16 is widened exactly."""
    m = _to_numpy(maps)
    if m.ndim != 3:
        raise UserError(f"{where}: maps must have shape (N, H, W), got {m.shape}")
    if not np.issubdtype(m.dtype, np.floating):
        raise UserError(f"{where}: maps must be floating point, got {m.dtype}")
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float32 if np.finfo(m.dtype).bits <= 32 else np.float64)
    for a in range(0, len(m), _BATCH):
        if not np.isfinite(m[a:a + _BATCH]).all():
            raise UserError(f"{where}: maps contain NaN or infinite values (image {a}..{a + _BATCH - 1}); "
                            "fix the scoring run that produced them")
    return m


# --------------------------------------------------------------------------- sorted sweep
def _label_batches(gt: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, regions, areas)`` per batch of images.

    ``regions`` ``(b, H, W)`` int32 holds class-wide region ids (8-connected ground-truth
    components, numbered from 1 across batches; 0 = GT negative), ``areas`` the pixel count of
    each new region in id order.
    """
    offset = 0
    for a in range(0, len(gt), _BATCH):
        lab, n = ndimage.label(gt[a:a + _BATCH], structure=_STRUCT_2D_IN_3D)  # (b, H, W) int32
        nz = np.flatnonzero(lab)
        areas = np.bincount(lab.ravel()[nz], minlength=n + 1)[1:]
        lab.ravel()[nz] += offset
        offset += n
        yield a, lab, areas


def _pack_keys(scores32: np.ndarray, regions: np.ndarray, out: np.ndarray, nonneg: bool) -> None:
    """``out`` = (order-preserving bits of float32 ``scores32``) << 32 | ``regions`` (all 1-D).

    For non-negative floats the raw IEEE bits already sort like the values; otherwise the usual
    sign flip (negative: all bits inverted, positive: sign bit set) makes them do so. -0 is
    turned into +0 first so that equal scores get equal keys.
    """
    bits = (scores32 + np.float32(0.0)).view(np.uint32)
    if not nonneg:
        bits ^= (np.uint32(0) - (bits >> np.uint32(31))) | np.uint32(0x80000000)
    out[:] = bits
    out <<= np.uint64(32)
    out |= regions.view(np.uint32)


def _group_ends(ties: np.ndarray, following: Any) -> np.ndarray:
    ends = np.empty(len(ties), dtype=bool)
    ends[:-1] = ties[:-1] != ties[1:]
    ends[-1] = following is None or ties[-1] != following
    return ends


def _desc_packed(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """From ascending packed keys (score bits << 32 | region), yield (regions, tie-group ends) descending."""
    mask = np.uint64(0xFFFFFFFF)
    hi = len(keys)
    while hi > 0:
        lo = max(0, hi - _CHUNK)
        k = keys[lo:hi][::-1]
        ties = k >> np.uint64(32)
        following = keys[lo - 1] >> np.uint64(32) if lo > 0 else None
        yield (k & mask).view(np.int64), _group_ends(ties, following)
        hi = lo


def _desc_argsort(scores: np.ndarray, regions: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Same stream as :func:`_desc_packed` for float64 scores (argsort; ~3x the memory)."""
    order = np.argsort(scores, kind="stable")
    hi = len(order)
    while hi > 0:
        lo = max(0, hi - _CHUNK)
        idx = order[lo:hi][::-1]
        following = scores[order[lo - 1]] if lo > 0 else None
        yield regions[idx].astype(np.int64, copy=False), _group_ends(scores[idx], following)
        hi = lo


def _sweep(stream: Iterable[tuple[np.ndarray, np.ndarray]], n_pos: int, n_neg: int,
           weights: np.ndarray | None, fpr_limit: float | None) -> dict[str, float]:
    """AUROC, AP, F1-max and (with ``weights``) AU-PRO in one pass over pixels by decreasing score.

    Every distinct score is a threshold (positive if score >= threshold); the counts of a tie
    group are taken at its last member, as scikit-learn's ``_binary_clf_curve`` and MVTec's
    ``compute_pro`` do. ``weights[r]`` = 1 / (num_regions * area of region r), so the cumulative
    weight is the per-region overlap averaged over regions (PRO). Counts are int64; the AUROC
    trapezoid is summed exactly in integers; AP = sum (R_n - R_{n-1}) P_n as scikit-learn
    defines it; F1 = 2 TP / (TP + FP + P). AU-PRO integrates PRO over FPR from (0, 0) up to
    ``fpr_limit`` (PRO interpolated linearly there) and divides by ``fpr_limit`` (MVTec AD
    ``trapezoid``). Requires ``n_pos > 0`` and ``n_neg > 0``.
    """
    seen_tp = seen_n = 0  # counts after the last pixel processed
    seen_w = 0.0
    g_tp = g_fp = 0  # counts at the last tie-group end (the previous curve point)
    g_fpr = g_pro = 0.0
    auc2, ap, f1 = 0, 0.0, 0.0
    pro_area, pro_done = 0.0, weights is None or fpr_limit is None
    for regions, ends in stream:
        tp = np.cumsum(regions > 0, dtype=np.int64)
        tp += seen_tp
        n = np.arange(seen_n + 1, seen_n + len(regions) + 1, dtype=np.int64)
        seen_tp, seen_n = int(tp[-1]), int(n[-1])
        tp_g = tp[ends]
        fp_g = n[ends] - tp_g
        if not pro_done:
            w = np.cumsum(weights[regions])
            w += seen_w
            seen_w = float(w[-1])
            pro_g = w[ends]
            del w
        del tp, n
        if len(tp_g) == 0:  # the whole chunk is inside one tie group
            continue
        tp_all = np.concatenate(([g_tp], tp_g))
        fp_all = np.concatenate(([g_fp], fp_g))
        auc2 += int(np.sum((tp_all[1:] + tp_all[:-1]) * np.diff(fp_all)))
        ap += float(np.sum(np.diff(tp_all) * (tp_g / (tp_g + fp_g))))
        f1 = max(f1, float(np.max(2.0 * tp_g / (tp_g + fp_g + n_pos))))
        if not pro_done:
            fpr = np.concatenate(([g_fpr], fp_g / n_neg))
            pro = np.concatenate(([g_pro], pro_g))
            pro_area, pro_done = _trapezoid_step(fpr, pro, fpr_limit, pro_area)
            g_fpr, g_pro = float(fpr[-1]), float(pro[-1])
        g_tp, g_fp = int(tp_g[-1]), int(fp_g[-1])
    if not pro_done:  # MVTec's (1, 1) end point, only reached for fpr_limit >= 1
        pro_area, _ = _trapezoid_step(np.array([g_fpr, 1.0]), np.array([g_pro, 1.0]), fpr_limit, pro_area)
    out = {"auroc": auc2 / (2.0 * n_pos * n_neg), "ap": ap / n_pos, "f1max": f1}
    if weights is not None and fpr_limit is not None:
        out["aupro"] = float(pro_area / fpr_limit)
    return out


def _trapezoid_step(x: np.ndarray, y: np.ndarray, limit: float, area: float) -> tuple[float, bool]:
    """Add the trapezoids of the polyline ``(x, y)`` (x non-decreasing) up to ``x = limit``.

    Returns the new area and whether ``limit`` was passed (the rest of the curve is ignored).
    """
    dx = np.diff(x)
    seg = 0.5 * (y[1:] + y[:-1]) * dx
    over = np.flatnonzero(x[1:] > limit)
    if over.size == 0:
        return area + float(np.sum(seg)), False
    j = int(over[0])  # first segment that ends beyond the limit
    area += float(np.sum(seg[:j]))
    x0, y0 = x[j], y[j]
    if x0 < limit:  # limit strictly inside the segment: interpolate PRO at the limit
        y_lim = y0 + (y[j + 1] - y0) * (limit - x0) / (x[j + 1] - x0)
        area += 0.5 * (y_lim + y0) * (limit - x0)
    return area, True


# --------------------------------------------------------------------------- metric functions
def ranking_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """AUROC, AP and F1-max of 1-D ``scores`` against binary ``labels`` (equal to scikit-learn).

    NaN for AUROC when only one label occurs, for AP / F1-max when there is no positive.
    """
    s = np.asarray(_to_numpy(scores), dtype=np.float64).ravel()
    y = np.asarray(_to_numpy(labels)).ravel().astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0:
        return {"auroc": math.nan, "ap": math.nan, "f1max": math.nan}
    out = _sweep(_desc_argsort(s, y.astype(np.int64)), n_pos, max(n_neg, 1), None, None)
    if n_neg == 0:
        out["auroc"] = math.nan
    return out


def pixel_metrics(maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and the exact AU-PRO of one class from a single sort of its pixels.

    Args:
        maps: ``(N, H, W)`` float scores of every image of the class.
        gt: ``(N, H, W)`` bool ground truth.
        fpr_limit: upper FPR limit of the AU-PRO integral (0.3 in the paper), in (0, 1].

    AU-PRO follows the MVTec AD evaluation: 8-connected GT components per image, every distinct
    score a threshold, PRO = overlap averaged over all components of the class, FPR over every
    GT-negative pixel of the class. float32 (and float16) scores are sorted as packed 64-bit keys
    ``(score bits << 32) | region id`` (8 bytes per pixel, in place); float64 scores that are not
    exactly float32 use an argsort (~20 bytes per pixel). NaN where undefined (no GT positive or
    no GT negative pixel).
    """
    m = _check_maps(maps, "pixel_metrics")
    if gt.shape != m.shape:
        raise UserError(f"maps {m.shape} and ground truth {gt.shape} differ in shape")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    n_pix = m.size
    n_pos = int(np.count_nonzero(gt))
    n_neg = n_pix - n_pos
    nan = {"auroc": math.nan, "ap": math.nan, "f1max": math.nan, "aupro": math.nan}
    if n_pos == 0:
        return nan
    packed = m.dtype == np.float32 or all(
        np.array_equal(m[a:a + _BATCH].astype(np.float32), m[a:a + _BATCH]) for a in range(0, len(m), _BATCH))
    areas = []
    if packed:
        keys = np.empty(n_pix, dtype=np.uint64)
        per_img = m[0].size
        nonneg = bool(m.min() >= 0)
        for a, lab, ar in _label_batches(gt):
            s32 = m[a:a + len(lab)].astype(np.float32, copy=False).ravel()
            _pack_keys(s32, lab.ravel(), keys[a * per_img:(a + len(lab)) * per_img], nonneg)
            areas.append(ar)
        keys.sort()
        stream = _desc_packed(keys)
    else:
        regions = []
        for _, lab, ar in _label_batches(gt):
            regions.append(lab.ravel())
            areas.append(ar)
        stream = _desc_argsort(m.ravel(), np.concatenate(regions))
    areas = np.concatenate(areas)
    weights = np.concatenate(([0.0], 1.0 / (len(areas) * areas.astype(np.float64))))
    if n_neg == 0:
        out = _sweep(stream, n_pos, 1, weights, None)
        return {**out, "auroc": math.nan, "aupro": math.nan}
    return _sweep(stream, n_pos, n_neg, weights, fpr_limit)


def aupro(maps: Any, gt: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """Exact AU-PRO (MVTec AD definition) up to ``fpr_limit``, normalised by it; see :func:`pixel_metrics`."""
    return pixel_metrics(maps, gt, fpr_limit)["aupro"]


def legacy_aupro(maps: Any, gt: np.ndarray, num_thresholds: int = LEGACY_NUM_THRESHOLDS) -> float:
    """AU-PRO as the DiAD/VLMDiff metric code computes it (the "legacy" protocol).

    Thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` over all maps of the class; a
    pixel is positive if its score > threshold; PRO = mean over the class's 8-connected GT
    regions of (positive pixels in region) / (region area); FPR = positive GT-negative pixels /
    all GT-negative pixels; rows with FPR < 0.3 are kept, their FPR divided by the largest kept
    FPR, and the area computed with ``sklearn.metrics.auc``. A plain loop over the thresholds
    (one full pass over the pixels each). NaN where undefined.
    """
    from sklearn.metrics import auc

    m = _check_maps(maps, "legacy_aupro")
    lo, hi = np.float64(m.min()), np.float64(m.max())
    flat = m.ravel()
    pos_idx, pos_reg, areas = [], [], []
    per_img = m[0].size
    for a, lab, ar in _label_batches(gt):
        nz = np.flatnonzero(lab)
        pos_idx.append(nz + a * per_img)
        pos_reg.append(lab.ravel()[nz] - 1)
        areas.append(ar)
    pos_idx, pos_reg, areas = np.concatenate(pos_idx), np.concatenate(pos_reg), np.concatenate(areas)
    n_neg = flat.size - len(pos_idx)
    if len(areas) == 0 or n_neg == 0 or hi == lo:
        return math.nan
    pos_scores = flat[pos_idx]
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
    return float(auc(fprs[keep] / fprs[keep].max(), pros[keep]))


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
    protocols = _protocols(protocol)
    m = _check_maps(maps, f"class {name!r}")
    if len(m) == 0:
        raise UserError(f"class {name!r} has no images; drop it or fix the class names")
    gt = binarize_masks(masks, mask_threshold)
    if gt.shape != m.shape:
        raise UserError(f"class {name!r}: maps {m.shape} and masks {gt.shape} differ in shape")
    labels = gt.reshape(len(gt), -1).any(axis=1)
    img = ranking_metrics(_image_scores(m, image_pooling), labels)
    pix = pixel_metrics(m, gt)
    official = {"auroc_image": img["auroc"], "ap_image": img["ap"], "f1max_image": img["f1max"],
                "auroc_pixel": pix["auroc"], "ap_pixel": pix["ap"], "f1max_pixel": pix["f1max"],
                "aupro": pix["aupro"]}
    undefined = [k for k, v in official.items() if math.isnan(v)]
    if undefined:
        logger.warning("class %r: %s undefined (NaN): %d of %d images anomalous, %d of %d pixels anomalous",
                       name, ", ".join(undefined), int(labels.sum()), len(labels), int(gt.sum()), gt.size)
    out: dict[str, dict[str, float]] = {}
    if "official" in protocols:
        out["official"] = official
    if "legacy" in protocols:
        flip = {k: (1.0 - v if v < 0.5 else v) for k, v in official.items() if k.startswith("auroc")}
        out["legacy"] = {**official, **flip, "aupro": legacy_aupro(m, gt)}
    return out


def _mean_rows(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    mean = {}
    for k in METRICS:
        vals = [row[k] for row in per_class.values()]
        ok = [v for v in vals if not math.isnan(v)]
        if len(ok) < len(vals):
            logger.warning("mean %s is over %d of %d classes (the others are NaN)", k, len(ok), len(vals))
        mean[k] = float(np.mean(ok)) if ok else math.nan
    return mean


def evaluate_stream(items: Iterable[tuple[str, Any, Any]], protocol: str = "official", image_pooling: str = "paper",
                    mask_threshold: float = 0.0) -> dict[str, Any]:
    """Evaluate class by class from ``(class_name, maps (N,H,W), masks (N,H,W))`` items.

    Only one class is held at a time, so peak memory is set by the largest class (about 13 bytes
    per pixel for float32 maps, uint8 masks and the official sort, plus the caller's copy).
    Returns ``{"per_class": {cls: {metric: value}}, "mean": {metric: value}}`` with fractions as
    Python floats (mean = arithmetic mean over the classes where a metric is defined); for
    ``protocol="both"`` ``{"official": <that>, "legacy": <that>}``. Each class may appear once.
    """
    protocols = _protocols(protocol)
    rows: dict[str, dict[str, dict[str, float]]] = {p: {} for p in protocols}
    for name, maps, masks in items:
        name = str(name)
        if name in rows[protocols[0]]:
            raise UserError(f"class {name!r} appears twice in the evaluation stream; pass each class once")
        for p, row in evaluate_class(name, maps, masks, protocol, image_pooling, mask_threshold).items():
            rows[p][name] = {k: float(v) for k, v in row.items()}
        logger.info("evaluated class %s (%d images)", name, len(maps))
    if not rows[protocols[0]]:
        raise UserError("nothing to evaluate: no classes given")
    result = {p: {"per_class": rows[p], "mean": _mean_rows(rows[p])} for p in protocols}
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

PAPER_RESULTS: dict[str, dict[str, float]] = {  # DESIGN section 9: VLMDiff paper, mean over classes
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
    return "nan" if math.isnan(v) else f"{100.0 * v:.1f}"


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """Markdown table of a result of :func:`evaluate` (percent, one decimal; classes, then "mean").

    A ``protocol="both"`` result gives one table per protocol.
    """
    if "per_class" not in result:
        return "\n\n".join(format_table(sub, f"{title} ({p})" if title else p) for p, sub in result.items())
    lines = [f"### {title}", ""] if title else []
    lines.append("| class | " + " | ".join(_HEADERS) + " |")
    lines.append("|---|" + "---:|" * len(_HEADERS))
    for name, row in [*result["per_class"].items(), ("mean", result["mean"])]:
        lines.append(f"| {name} | " + " | ".join(_pct(row[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def compare_to_paper(mean_row: dict[str, float], dataset: str) -> str:
    """Markdown table of our mean row, the paper's (DESIGN section 9) and the difference, in points."""
    key = _DATASET_ALIASES.get(dataset, dataset)
    if key not in PAPER_RESULTS:
        raise UserError(f"no published results for dataset {dataset!r}; known: {', '.join(PAPER_RESULTS)}")
    paper = PAPER_RESULTS[key]
    diff = {k: mean_row[k] - paper[k] for k in METRICS}
    lines = ["| | " + " | ".join(_HEADERS) + " |", "|---|" + "---:|" * len(_HEADERS)]
    for label, row in (("ours", mean_row), (f"paper ({key})", paper)):
        lines.append(f"| {label} | " + " | ".join(_pct(row[k]) for k in METRICS) + " |")
    lines.append("| difference | " + " | ".join(
        "nan" if math.isnan(diff[k]) else f"{100.0 * diff[k]:+.1f}" for k in METRICS) + " |")
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
        raise UserError(f"{path}: class_names has shape {arrays['class_names'].shape}, expected ({len(arrays['maps'])},)")
    return arrays["maps"], arrays["masks"], arrays["class_names"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmdiff.metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".npz with maps (or preds), masks, class_names (or clsname)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="official")
    p.add_argument("--image_pooling", choices=scoring.POOLINGS, default="paper")
    p.add_argument("--mask_threshold", type=float, default=0.0,
                   help="ground truth = mask > this fraction of full scale (255 for uint8, 1 otherwise)")
    p.add_argument("--output", help="write the metrics (fractions, NaN as null) to this JSON file")
    return p.parse_args(argv)


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
