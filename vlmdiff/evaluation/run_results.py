"""A test run's results as files: its scores.csv and metrics.json read back, and mean rows averaged.

Shared by the report page (:mod:`report_page`), the command line (:mod:`report`) and the paper tables
(:mod:`paper_table`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.io import read_json
from vlmdiff.evaluation.metric_table import (
    METRICS,
)
from vlmdiff.evaluation.run_folder import RunFolder


def run_dir(run: str | Path) -> RunFolder:
    path = Path(run)
    if path.is_file() and path.name == RunFolder.METRICS:
        path = path.parent
    folder = RunFolder(path)
    if not folder.scores.is_file() and not folder.metrics_json.is_file():
        raise UserError(
            f"{run}: not a test run folder (no {RunFolder.SCORES} or {RunFolder.METRICS}); give test.py's --output_dir"
        )
    return folder


def read_scores(run: RunFolder) -> list[dict[str, str]]:
    """The rows of a run's scores.csv (see :data:`evaluate.SCORES_COLUMNS`)."""
    path = run.scores
    if not path.is_file():
        raise UserError(f"{path}: file not found; re-evaluate the run (test.py ... --run_eval_only)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"id", "class", "label", "image_score", "visual_path"} <= set(rows[0]):
        raise UserError(
            f"{path}: written by an older version (columns {', '.join(rows[0])}); "
            "re-evaluate the run (test.py ... --run_eval_only)"
        )
    return rows


def read_metrics(run: str | Path | RunFolder) -> dict[str, Any] | None:
    """``{protocol: {"per_class", "mean"}}`` of a run (None values as NaN), or None for a run without metrics."""
    path = run.metrics_json if isinstance(run, RunFolder) else Path(run)
    path = RunFolder(path).metrics_json if path.is_dir() else path
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise UserError(f"{path}: no 'metrics' entry; is it test.py's metrics.json?")

    def nan(row: dict) -> dict[str, float]:
        return {k: math.nan if row.get(k) is None else float(row[k]) for k in METRICS}

    return {
        p: {"per_class": {c: nan(r) for c, r in res.get("per_class", {}).items()}, "mean": nan(res["mean"])}
        for p, res in data["metrics"].items()
    }


def read_mean(run: str | Path | RunFolder, protocol: str) -> dict[str, float]:
    """The mean row of ``protocol`` of a run (folder or metrics.json)."""
    metrics = read_metrics(run)
    if metrics is None or protocol not in metrics:
        raise UserError(f"{run} has no '{protocol}' metrics (was test.py run with --metrics_protocol {protocol}?)")
    return metrics[protocol]["mean"]


def average(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}


def dataset_of(run: RunFolder) -> str | None:
    path = run.metrics_json
    if not path.is_file():
        return None
    return read_json(path).get("provenance", {}).get("data_set")
