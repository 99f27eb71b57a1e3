"""Curves of a test run: the points behind the metrics, kept small, and their figures (PNG).

Evaluation hands every class's curve points to :func:`class_curves`: the points of the exact curves
the metrics are computed from, kept at a resolution of ``RESOLUTION`` along the curve while they are
computed (:func:`curves.thin`, piece by piece; see :func:`metrics.evaluate_stream`); on
the monotone ROC and PRO curves this moves an area by less than ``RESOLUTION / 4``. The result is plain
JSON (``curves.json`` of a run) that the report draws without reading a pixel again.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas (no pyplot state, no
display), one per class (image ROC and PR, pixel ROC and PR, PRO with the FPR limit, image-score
histograms) and one for the mean over classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.io import atomic_open
from vlmdiff.evaluation.array_metrics import FPR_LIMIT
from vlmdiff.evaluation.curves import RESOLUTION, thin  # noqa: F401  (the resolution and thinning of the kept points)

_GRID = np.linspace(0.0, 1.0, 501)  # common x axis of the mean curves


def _list(a: np.ndarray, digits: int | None = 7) -> list[float]:
    """Plain floats (rounded to ``digits``; None: exact, for thresholds)."""
    return [float(v) if digits is None else round(float(v), digits) for v in a]


def _ranking_curves(res: dict[str, Any]) -> dict[str, Any] | None:
    """JSON-able ROC, PR (and PRO) points of one result of ``ranking_metrics``/``pixel_metrics``."""
    c = res.get("curves")
    if c is None:
        return None
    out: dict[str, Any] = {
        "n_pos": int(c["n_pos"]),
        "n_neg": int(c["n_neg"]),
        "f1max_threshold": res["f1max_threshold"],
        "auroc": res["auroc"],
        "ap": res["ap"],
        "f1max": res["f1max"],
    }
    if "roc" in c:
        out["roc"] = {"fpr": _list(c["roc"]["fpr"]), "tpr": _list(c["roc"]["tpr"])}
    pr = c["pr"]
    out["pr"] = {
        "recall": _list(pr["recall"]),
        "precision": _list(pr["precision"]),
        "threshold": _list(pr["threshold"], None),
        "tp": [int(v) for v in pr["tp"]],
        "fp": [int(v) for v in pr["fp"]],
    }
    if "pro" in c:
        out["pro"] = {
            "fpr": _list(c["pro"]["fpr"]),
            "pro": _list(c["pro"]["pro"]),
            "aupro": res["aupro"],
            "fpr_limit": c["pro"]["fpr_limit"],
        }
    return out


def class_curves(curves: dict[str, Any], display_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The JSON record of one class from the ``curves`` of :func:`metrics.evaluate_stream`.

    ``{"image": {roc, pr, f1max_threshold, ...} | None, "pixel": {roc, pr, pro, ...} | None,
    "display_range": [lo, hi]}``; ``None`` where the class has no anomalous image / pixel.
    Metric values in it are the official protocol's (the curves are the official ones).
    """
    return {
        "image": _ranking_curves(curves["image"]),
        "pixel": _ranking_curves(curves["pixel"]),
        "display_range": list(display_range) if display_range else None,
    }


def area_to_limit(fpr: Sequence[float], pro: Sequence[float], limit: float = FPR_LIMIT) -> float:
    """Trapezoid area under the points ``(fpr, pro)`` from 0 to ``limit``, divided by ``limit``."""
    x, y = np.asarray(fpr, float), np.asarray(pro, float)
    keep = x <= limit
    return float(np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * np.diff(x[keep])) / limit)


def f1max_threshold(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The image score with the largest F1 (anomalous = score >= it); None without an anomalous image."""
    from vlmdiff.evaluation.array_metrics import ranking_metrics

    labels = np.asarray(labels, bool)
    if not labels.any():
        return None
    return ranking_metrics(scores, labels, keep_curves=True)["f1max_threshold"]


def pooled_pixel_threshold(classes: dict[str, dict[str, Any]]) -> float | None:
    """F1-max threshold of the pixels of all classes pooled, from the kept PR points of each class.

    The candidates are every kept threshold; a class's counts at a candidate are those of its nearest
    kept threshold at or above it (exact at its own kept points, an undercount between them).
    """
    pix = [c["pixel"] for c in classes.values() if c.get("pixel")]
    if not pix:
        return None
    candidates = np.unique(np.concatenate([p["pr"]["threshold"] for p in pix]))
    tp = np.zeros(len(candidates))
    fp = np.zeros(len(candidates))
    n_pos = sum(p["n_pos"] for p in pix)
    for p in pix:
        th = np.asarray(p["pr"]["threshold"])[::-1]  # ascending
        ctp, cfp = np.asarray(p["pr"]["tp"])[::-1], np.asarray(p["pr"]["fp"])[::-1]
        j = np.searchsorted(th, candidates, side="left")  # first kept threshold >= candidate
        inside = j < len(th)
        tp[inside] += ctp[j[inside]]
        fp[inside] += cfp[j[inside]]
    f1 = 2.0 * tp / (tp + fp + n_pos)
    return float(candidates[int(np.argmax(f1))])


# --------------------------------------------------------------------------- figures
def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.1f}%"


def _empty(ax, title: str, why: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _roc(ax, c: dict | None, title: str, what: str) -> None:
    if not c or "roc" not in c:
        return _empty(ax, f"{title}: {what} ROC", "needs normal and anomalous samples")
    ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], lw=1.5)
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(f"{title}: {what} AU-ROC {_pct(c['auroc'])}", fontsize=9)


def _pr(ax, c: dict | None, title: str, what: str) -> None:
    if not c:
        return _empty(ax, f"{title}: {what} PR", "no anomalous samples")
    ax.plot(c["pr"]["recall"], c["pr"]["precision"], lw=1.5, drawstyle="steps-post")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
    ax.set_title(f"{title}: {what} AP {_pct(c['ap'])}, F1-max {_pct(c['f1max'])}", fontsize=9)


def _pro(ax, c: dict | None, title: str) -> None:
    if not c or "pro" not in c:
        return _empty(ax, f"{title}: PRO", "needs normal and anomalous pixels")
    p = c["pro"]
    x, y = np.asarray(p["fpr"]), np.asarray(p["pro"])
    ax.plot(x, y, lw=1.5)
    lim = p["fpr_limit"]
    ax.fill_between(x[x <= lim], y[x <= lim], alpha=0.2)
    ax.axvline(lim, color="tab:red", ls="--", lw=1, label=f"FPR limit {lim:g}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (pixels)", ylabel="per-region overlap")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"{title}: AU-PRO (to {lim:g}) {_pct(p['aupro'])}", fontsize=9)


def _hist(ax, scores: np.ndarray, labels: np.ndarray, threshold: float | None, title: str) -> None:
    if len(scores) == 0:
        return _empty(ax, f"{title}: image scores", "no images")
    bins = np.histogram_bin_edges(scores, bins=min(40, max(5, len(scores) // 3)))
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"normal ({int(np.sum(labels == 0))})", color="tab:blue")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({int(np.sum(labels == 1))})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label="F1-max threshold")
    ax.set(xlabel="image score", ylabel="images")
    ax.legend(fontsize=7)
    th = "" if threshold is None else f", F1-max threshold {threshold:.4g}"
    ax.set_title(f"{title}: image scores{th}", fontsize=9)


def _grid_figure() -> Figure:
    """A 1200x720-pixel figure for a 2x3 grid of panels (fixed margins: a layout engine costs ~1 s a figure)."""
    fig = Figure(figsize=(15, 9), dpi=80)
    fig.subplots_adjust(left=0.05, right=0.985, top=0.96, bottom=0.065, wspace=0.22, hspace=0.28)
    return fig


def class_figure(name: str, curves: dict[str, Any], scores: np.ndarray, labels: np.ndarray) -> Figure:
    """Six panels of one class: image ROC, image PR, score histograms / pixel ROC, pixel PR, PRO."""
    fig = _grid_figure()
    ax = fig.subplots(2, 3)
    img, pix = curves.get("image"), curves.get("pixel")
    _roc(ax[0, 0], img, name, "image")
    _pr(ax[0, 1], img, name, "image")
    _hist(ax[0, 2], scores, labels, img["f1max_threshold"] if img else None, name)
    _roc(ax[1, 0], pix, name, "pixel")
    _pr(ax[1, 1], pix, name, "pixel")
    _pro(ax[1, 2], pix, name)
    return fig


def _mean_panel(
    ax,
    classes: dict[str, dict],
    kind: str,
    curve: str,
    xkey: str,
    ykey: str,
    title: str,
    value: float | None,
    xlabel: str,
    ylabel: str,
    limit: float | None = None,
) -> None:
    ys = []
    for name, c in classes.items():
        part = (c.get(kind) or {}).get(curve)
        if not part:
            continue
        x, y = np.asarray(part[xkey]), np.asarray(part[ykey])
        ax.plot(
            x,
            y,
            lw=0.7,
            alpha=0.5,
            label=name if len(classes) <= 12 else None,
            drawstyle="steps-post" if curve == "pr" else "default",
        )
        if curve == "pr":  # precision at each recall: the best precision at that recall or above
            order = np.argsort(x, kind="stable")
            ys.append(np.interp(_GRID, x[order], np.maximum.accumulate(y[order][::-1])[::-1]))
        else:
            ys.append(np.interp(_GRID, x, y))
    if not ys:
        return _empty(ax, f"mean: {title}", "no class has this curve")
    ax.plot(_GRID, np.mean(ys, axis=0), color="k", lw=2, label=f"mean of {len(ys)}")
    if limit is not None:
        ax.axvline(limit, color="tab:red", ls="--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title(f"mean: {title} {_pct(value)}", fontsize=9)


def mean_figure(
    classes: dict[str, dict[str, Any]],
    mean_row: dict[str, float],
    scores: np.ndarray,
    labels: np.ndarray,
    threshold: float | None,
) -> Figure:
    """The class curves overlaid, their mean (averaged on a common x grid) bold, titled with the mean metrics."""
    fig = _grid_figure()
    ax = fig.subplots(2, 3)
    _mean_panel(
        ax[0, 0],
        classes,
        "image",
        "roc",
        "fpr",
        "tpr",
        "image AU-ROC",
        mean_row.get("auroc_image"),
        "false positive rate",
        "true positive rate",
    )
    _mean_panel(
        ax[0, 1],
        classes,
        "image",
        "pr",
        "recall",
        "precision",
        "image AP",
        mean_row.get("ap_image"),
        "recall",
        "precision",
    )
    _hist(ax[0, 2], scores, labels, threshold, "all classes")
    _mean_panel(
        ax[1, 0],
        classes,
        "pixel",
        "roc",
        "fpr",
        "tpr",
        "pixel AU-ROC",
        mean_row.get("auroc_pixel"),
        "false positive rate",
        "true positive rate",
    )
    _mean_panel(
        ax[1, 1],
        classes,
        "pixel",
        "pr",
        "recall",
        "precision",
        "pixel AP",
        mean_row.get("ap_pixel"),
        "recall",
        "precision",
    )
    _mean_panel(
        ax[1, 2],
        classes,
        "pixel",
        "pro",
        "fpr",
        "pro",
        f"AU-PRO (to {FPR_LIMIT:g})",
        mean_row.get("aupro"),
        "false positive rate (pixels)",
        "per-region overlap",
        limit=FPR_LIMIT,
    )
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` with the Agg canvas into a PNG at ``path`` (atomically)."""
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", pil_kwargs={"compress_level": 1})
    return Path(path)
