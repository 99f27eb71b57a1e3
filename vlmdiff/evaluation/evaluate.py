"""Evaluating a run folder (:mod:`run_folder`): metrics, curves, thresholds, scores.csv and strips from the
stored maps."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.io import atomic_open, read_json, write_json, write_text
from vlmdiff.evaluation import metrics as M
from vlmdiff.evaluation import plots as P
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.metric_table import METRICS
from vlmdiff.evaluation.run_folder import RunFolder
from vlmdiff.evaluation.thresholds import class_thresholds, decide, thresholds_record, write_thresholds
from vlmdiff.evaluation.visuals import DisplaySample, finish_class, save_png
from vlmdiff.scoring import image_score

SCORES_COLUMNS = (
    "id",
    "class",
    "label",
    "image_score",
    "map_max",
    "image_path",
    "visual_path",
    "decision",
    "threshold",
    "mask_path",
)


def _score_rows(
    run: RunFolder,
    cls: str,
    ids: np.ndarray,
    labels: np.ndarray | None,
    scores: np.ndarray,
    map_max: np.ndarray,
    image_paths: dict[str, str] | None,
    decided: np.ndarray | None = None,
    threshold: float | None = None,
    masks_written: bool = False,
) -> list[list[str]]:
    """Rows of scores.csv for one class, sorted by id (``labels`` None: unknown; ``decided``: True = anomalous).
    Scores and thresholds are written in full (``repr``), so ``score >= threshold`` gives the run's decisions."""
    rows = []
    for i in np.argsort(ids, kind="stable").tolist():
        image_id = str(ids[i])
        visual = run.visual(cls, image_id)
        rows.append(
            [
                image_id,
                cls,
                "" if labels is None else str(int(labels[i])),
                repr(float(scores[i])),  # full precision: score >= threshold gives the run's decisions
                repr(float(map_max[i])),
                (image_paths or {}).get(image_id, ""),
                run.relative(visual) if visual.is_file() else "",
                "" if decided is None else ("anomalous" if decided[i] else "normal"),
                "" if threshold is None else repr(float(threshold)),
                run.relative(run.mask(cls, image_id)) if masks_written else "",
            ]
        )
    return rows


def write_scores(run: RunFolder, rows: list[list[str]]) -> Path:
    """scores.csv: one row per image (:data:`SCORES_COLUMNS`; empty where unknown), sorted by class and id."""
    path = run.scores
    with atomic_open(path, "w") as f:
        w = csv.writer(f)
        w.writerow(SCORES_COLUMNS)
        w.writerows(rows)
    return path


def evaluate_run(
    output_dir: Path,
    protocol: str,
    pooling: str,
    mask_threshold: float = 0.0,
    visuals: bool = False,
    dataset_name: str | None = None,
    extra: dict[str, Any] | None = None,
    image_paths: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Metrics from the stored maps, class by class, and everything the report shows, from the same reads.

    Writes metrics.json / .csv / .md, curves.json (the curve points, :mod:`plots`),
    thresholds.json (F1-max thresholds, :mod:`thresholds`), scores.csv and, with ``visuals``,
    the finished strips (one more read of each class). Each class is read chunk file by chunk file
    (:meth:`MapStore.class_sources`), so memory does not grow with the size of a class.
    ``image_paths``: {image id: image file} for scores.csv.
    """
    run = RunFolder(output_dir)
    store = MapStore(run.maps)
    manifest = read_json(run.manifest)
    sources = dict(store.class_sources())
    samples = {cls: DisplaySample(len(source)) for cls, source in sources.items()}
    curves: dict[str, dict[str, Any]] = {}
    rows: list[list[str]] = []
    pooled: list[tuple[np.ndarray, np.ndarray]] = []

    def on_curves(cls: str, c: dict[str, Any]) -> None:
        display = samples.pop(cls).range()
        curves[cls] = P.class_curves(c, display)
        scores, labels, ids = c["image_scores"], c["labels"], c["ids"]
        if visuals:
            finish_class(
                run.panels,
                run.visuals,
                cls,
                sources[cls].chunks(),
                display,
                dict(zip(ids.tolist(), scores.tolist(), strict=True)),
            )
        rows.extend(_score_rows(run, cls, ids, labels, scores, c["map_max"], image_paths))
        pooled.append((scores, labels))

    result = M.evaluate_stream(
        sources.items(),
        protocol=protocol,
        image_pooling=pooling,
        mask_threshold=mask_threshold,
        on_curves=on_curves,
        on_chunk=lambda cls, chunk: samples[cls].add(chunk["maps"]),
    )
    by_protocol = result if protocol == "both" else {protocol: result}
    write_json(
        run.metrics_json,
        {
            "metrics": M._nan_to_none(by_protocol),
            "settings": {"protocol": protocol, "image_pooling": pooling, "mask_threshold": mask_threshold},
            **(extra or {}),
        },
    )
    write_text(run.metrics_csv, metrics_csv(by_protocol))
    md = [M.format_table(sub, f"{protocol_name} protocol") for protocol_name, sub in by_protocol.items()]
    if dataset_name and dataset_name in M.PAPER_RESULTS:
        md.append(
            f"### mean vs the paper ({dataset_name})\n\n"
            + M.paper_comparison(M.paper_means(by_protocol, "both" if protocol == "both" else None), dataset_name)
        )
    write_text(run.metrics_md, "\n\n".join(md) + "\n")
    write_json(
        run.curves,
        M._nan_to_none(
            {"fpr_limit": M.FPR_LIMIT, "resolution": P.RESOLUTION, "image_pooling": pooling, "classes": curves}
        ),
        indent=None,
    )
    image_overall = P.f1max_threshold(np.concatenate([s for s, _ in pooled]), np.concatenate([y for _, y in pooled]))
    write_thresholds(run, thresholds_record(curves, image_overall, P.pooled_pixel_threshold(curves), pooling, manifest))
    write_scores(run, rows)
    return by_protocol


def label_run(
    output_dir: Path,
    pooling: str,
    image_paths: dict[str, str] | None = None,
    visuals: bool = False,
    threshold_record: dict[str, Any] | None = None,
) -> Path:
    """Scores of a run without ground truth: scores.csv, finished strips and, with ``threshold_record``
    (:func:`thresholds.load_thresholds`), a normal/anomalous decision per image and a binary mask
    PNG (map >= pixel threshold) per image under ``masks/{class}/``. Returns the scores.csv path.
    Each class is read chunk by chunk: once for the scores, again for the masks and strips.
    """
    run = RunFolder(output_dir)
    store = MapStore(run.maps)
    rows: list[list[str]] = []
    for cls, source in store.class_sources():
        sample = DisplaySample(len(source))
        ids, scores, map_max = [], [], []
        for chunk in source.chunks(("ids", "maps")):
            maps = chunk["maps"].astype(np.float32)
            ids.append(chunk["ids"])
            scores.append(image_score(torch.from_numpy(maps), pooling).numpy())
            map_max.append(maps.reshape(len(maps), -1).max(axis=1))
            sample.add(maps)
        ids_a, scores_a, display = np.concatenate(ids), np.concatenate(scores), sample.range()
        decided, image_t, decisions = None, None, None
        if threshold_record is not None:
            image_t, pixel_t = class_thresholds(threshold_record, cls)
            decided = decide(scores_a, image_t)
            decisions = {
                "image": dict(zip(ids_a.tolist(), decided.tolist(), strict=True)),
                "image_threshold": image_t,
                "pixel_threshold": pixel_t,
            }
            if pixel_t is not None:
                for chunk in source.chunks(("ids", "maps")):
                    for image_id, amap in zip(chunk["ids"].tolist(), chunk["maps"], strict=True):
                        save_png(
                            run.mask(cls, image_id),
                            ((amap >= pixel_t) * 255).astype(np.uint8),
                        )
        if visuals:
            finish_class(
                run.panels,
                run.visuals,
                cls,
                source.chunks(),
                display,
                dict(zip(ids_a.tolist(), scores_a.tolist(), strict=True)),
                decisions,
                labelled=False,
            )
        rows.extend(
            _score_rows(
                run,
                cls,
                ids_a,
                None,
                scores_a,
                np.concatenate(map_max),
                image_paths,
                decided,
                image_t,
                masks_written=decisions is not None and decisions["pixel_threshold"] is not None,
            )
        )
    return write_scores(run, rows)


def metrics_csv(by_protocol: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["protocol", "class", *METRICS])
    for protocol, res in by_protocol.items():
        for cls, row in [*res["per_class"].items(), ("mean", res["mean"])]:
            w.writerow([protocol, cls, *("" if math.isnan(row[k]) else f"{row[k]:.6f}" for k in METRICS)])
        w.writerow([protocol, "classes in mean", *(res["mean_over"][k] for k in METRICS)])
    return buf.getvalue()
