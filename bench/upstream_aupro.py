"""The legacy AU-PRO computed as the DiAD/VLMDiff metric code does it: a loop over 200 thresholds that labels
the ground-truth regions again at each one. For timing against the project's metrics (bench_eval.py).
"""

from __future__ import annotations

import numpy as np

from vlmdiff.evaluation import array_metrics


def upstream_style_legacy_aupro(
    maps: np.ndarray, gt: np.ndarray, num_thresholds: int = 200, fpr_limit: float = array_metrics.FPR_LIMIT
) -> float:
    """Legacy AU-PRO computed the way the DiAD/VLMDiff metric code does it (for timing only).

    For each of ``num_thresholds`` thresholds ``np.arange(min, max, step)``: binarise all maps
    (score > threshold); for every image, label its ground truth into 8-connected regions with
    ``skimage.measure.label`` and add (predicted pixels in region) / area for each region found by
    ``regionprops``; FPR = predicted GT-negative pixels / GT-negative pixels of the class. Keep the
    points with FPR < ``fpr_limit``, divide FPR by the largest kept one, trapezoid area. The
    labelling is redone at every threshold, as there. Equals :func:`vlmdiff.evaluation.array_metrics.legacy_aupro`.
    """
    from skimage import measure

    lo, hi = float(maps.min()), float(maps.max())
    negatives = ~gt
    n_neg = np.count_nonzero(negatives)
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / num_thresholds):
        binary = maps > th  # (N, H, W)
        region_pros = []
        for pred, mask in zip(binary, gt, strict=True):
            for region in measure.regionprops(measure.label(mask, connectivity=2)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                region_pros.append(np.count_nonzero(pred[rows, cols]) / region.area)
        fprs.append(np.count_nonzero(binary & negatives) / n_neg)
        pros.append(float(np.mean(region_pros)))
    fpr, pro = np.asarray(fprs), np.asarray(pros)
    keep = fpr < fpr_limit
    x, y = fpr[keep] / fpr[keep].max(), pro[keep]
    return float(-np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))  # x falls as the threshold rises
