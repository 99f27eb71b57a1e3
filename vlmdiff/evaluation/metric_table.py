"""The metrics of an evaluation, one entry each, and everything derived from that table.

:data:`TABLE` lists each metric once: its key (in metrics.json / .csv), its column header, its level (image
or pixel), which entry of that level's result holds it (:func:`class_metrics.evaluate_source`), its
direction, whether the VLMDiff paper reports it, and what the legacy protocol does with it. The metric
names, the rows of an evaluation (both protocols), the paper's rows (:data:`PAPER_RESULTS`), the markdown
tables, metrics.csv and the report's columns all derive from it: a new metric is one entry here, its
computation in :mod:`class_metrics` / :mod:`curves`, and a test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from utils.errors import UserError
from vlmdiff.data.registry import ALIASES


@dataclass(frozen=True)
class Metric:
    """One metric of the evaluation (see the module docstring)."""

    key: str  # name in metrics.json / metrics.csv
    header: str  # column header of the tables
    level: Literal["image", "pixel"]  # scored per image, or per pixel
    field: str  # its entry in that level's result of class_metrics.evaluate_source
    higher_is_better: bool = True
    paper_column: bool = True  # the VLMDiff paper reports it (a column of PAPER_RESULTS)
    # legacy protocol (the DiAD/VLMDiff metric code): the same value, an AU-ROC below 0.5 flipped, or its own
    # computation (``legacy_{field}`` of the result)
    legacy: Literal["same", "flip", "own"] = "same"


TABLE: tuple[Metric, ...] = (
    Metric("auroc_image", "AU-ROC_I", "image", "auroc", legacy="flip"),
    Metric("ap_image", "AP_I", "image", "ap"),
    Metric("f1max_image", "F1max_I", "image", "f1max"),
    Metric("auroc_pixel", "AU-ROC_P", "pixel", "auroc", legacy="flip"),
    Metric("ap_pixel", "AP_P", "pixel", "ap"),
    Metric("f1max_pixel", "F1max_P", "pixel", "f1max"),
    Metric("aupro", "AU-PRO", "pixel", "aupro", legacy="own"),
)
METRICS = tuple(m.key for m in TABLE)
HEADERS = tuple(m.header for m in TABLE)
PAPER_COLUMNS = tuple(m.key for m in TABLE if m.paper_column)


def official_row(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of one class from :func:`class_metrics.evaluate_source`'s ``result``, official protocol."""
    return {m.key: result[m.level][m.field] for m in TABLE}


def legacy_row(official: dict[str, float], result: dict[str, Any]) -> dict[str, float]:
    """The legacy protocol's row from the official one and the legacy computations of ``result``."""
    row = {}
    for m in TABLE:
        v = official[m.key]
        if m.legacy == "flip":
            v = 1.0 - v if v < 0.5 else v
        elif m.legacy == "own":
            v = result[f"legacy_{m.field}"]
        row[m.key] = v
    return row


def paper_row(percent: Sequence[float]) -> dict[str, float]:
    """A row of the paper's table: one value (percent) per :data:`PAPER_COLUMNS` entry, as fractions."""
    if len(percent) != len(PAPER_COLUMNS):
        raise ValueError(
            f"a paper row needs {len(PAPER_COLUMNS)} values ({', '.join(PAPER_COLUMNS)}), got {len(percent)}"
        )
    return {k: v / 100.0 for k, v in zip(PAPER_COLUMNS, percent, strict=True)}


PAPER_RESULTS: dict[str, dict[str, float]] = {  # the VLMDiff paper (WACV 2026), mean over classes
    "realiad": paper_row((78.0, 73.2, 69.8, 97.1, 25.5, 32.3, 87.7)),
    "coco": paper_row((59.1, 51.2, 62.9, 69.0, 15.3, 22.4, 38.8)),
    "mvtec": paper_row((90.6, 95.7, 94.2, 95.9, 51.8, 53.6, 89.4)),
    "visa": paper_row((80.9, 83.9, 80.7, 97.0, 28.3, 33.6, 81.0)),
}
_DATASET_ALIASES = {**dict(ALIASES), "mvtec_ad": "mvtec", "coco_ad": "coco"}  # also the paper's names


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100.0 * v:.1f}"


def format_table(result: dict[str, Any], title: str | None = None) -> str:
    """Markdown table of a result of :func:`metrics.evaluate` (percent, one decimal; classes, then "mean").

    A ``protocol="both"`` result gives one table per protocol. With ``mean_over`` in the result a last
    row says over how many classes each column's mean is taken; "n/a" marks an undefined metric.
    """
    if "per_class" not in result:
        return "\n\n".join(format_table(sub, f"{title} ({p})" if title else p) for p, sub in result.items())
    lines = [f"### {title}", ""] if title else []
    lines.append("| class | " + " | ".join(HEADERS) + " |")
    lines.append("|---|" + "---:|" * len(HEADERS))
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
    """Markdown table: our mean row per protocol, the paper's row (legacy protocol) and the differences
    (in points; positive where ours is better).

    ``means``: ``{protocol: mean row}`` (a ``None`` key is an unlabelled row "ours"). Every row says
    its protocol; the paper's numbers come from the DiAD/VLMDiff metric code (the legacy protocol), so
    only a legacy row is a like-for-like comparison.
    """
    key = _DATASET_ALIASES.get(dataset, dataset)
    if key not in PAPER_RESULTS:
        raise UserError(f"no published results for dataset {dataset!r}; known: {', '.join(PAPER_RESULTS)}")
    paper = {k: PAPER_RESULTS[key].get(k, math.nan) for k in METRICS}  # n/a where the paper has no column
    labelled = [p is not None for p in means]
    lines = ["| | " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * len(HEADERS)]
    for protocol, row in means.items():
        lines.append(
            f"| ours{f' ({protocol} protocol)' if protocol else ''} | "
            + " | ".join(_pct(row[k]) for k in METRICS)
            + " |"
        )
    lines.append(
        f"| paper ({key}{', legacy protocol' if any(labelled) else ''}) | "
        + " | ".join(_pct(paper[k]) for k in METRICS)
        + " |"
    )
    for protocol, row in means.items():
        diff = {m.key: (row[m.key] - paper[m.key]) * (1 if m.higher_is_better else -1) for m in TABLE}
        lines.append(
            f"| difference{f' ({protocol})' if protocol else ''} | "
            + " | ".join("n/a" if math.isnan(diff[k]) else f"{100.0 * diff[k]:+.1f}" for k in METRICS)
            + " |"
        )
    return "\n".join(lines)
