"""The static report page of a test run (report.html) and the side-by-side page of several runs.

The page opens from disk (no server): the metric table beside the paper's row, the curves per class and for
the mean, galleries (:mod:`galleries`) and the run's provenance, drawn from the files the run wrote.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from utils.errors import UserError
from utils.io import read_json, write_text
from vlmdiff.data.registry import ALIASES
from vlmdiff.evaluation import plots
from vlmdiff.evaluation.galleries import galleries, gallery_pictures
from vlmdiff.evaluation.metric_table import (
    METRICS,
    PAPER_RESULTS,
    format_table,
    paper_comparison,
    paper_means,
)
from vlmdiff.evaluation.run_folder import RunFolder
from vlmdiff.evaluation.run_results import dataset_of, read_metrics, read_scores, run_dir

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1600px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.mean td{font-weight:bold}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;max-width:100%}
.gallery img{max-width:100%;border:1px solid #ccc}figcaption{font-size:.8em}
img.curves{max-width:100%}pre{background:#f6f6f6;padding:.5em;overflow:auto;max-height:30em}
.note{color:#555;font-size:.9em}
"""


def escape(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _url(path: str | Path) -> str:
    """A relative file path as an attribute value: percent-encoded (ids may hold '#', '%', '?'), then escaped."""
    return escape(quote(Path(path).as_posix()))


def md_table_html(md: str) -> str:
    """A markdown table (as :mod:`metrics` writes them) as an HTML table; '### ' lines become captions."""
    out, rows = [], []
    for line in md.splitlines():
        if line.startswith("### "):
            out.append(f"<h3>{escape(line[4:])}</h3>")
        elif line.startswith("|") and not set(line) <= set("|-:"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    if rows:
        head, body = rows[0], rows[1:]
        out.append("<table><tr>" + "".join(f"<th>{escape(c)}</th>" for c in head) + "</tr>")
        for r in body:
            cls = ' class="mean"' if r[0] == "mean" else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def _provenance(run: RunFolder) -> str:
    manifest = read_json(run.manifest) if run.manifest.is_file() else {}
    prov = read_json(run.metrics_json).get("provenance", {}) if run.metrics_json.is_file() else {}
    ckpt = manifest.get("checkpoint") or {}
    items = [
        (
            "checkpoint",
            f"{ckpt.get('path', '?')} (weights sha256 {ckpt['weights_sha256']})"
            if "weights_sha256" in ckpt
            else f"{ckpt.get('path', '?')} ({ckpt.get('size', '?')} bytes, sha256 of head+tail "
            f"{ckpt.get('sha256_head_tail', '?')})"
            if ckpt
            else "?",
        ),
        ("feature extractor", (manifest.get("feature_extractor") or {}).get("name", "?")),
        ("reconstruction", json.dumps(manifest.get("reconstruction", {}))),
        ("data", json.dumps(manifest.get("data", {}))),
        ("command", " ".join(prov.get("command", [])) or "?"),
        ("git commit", prov.get("git_commit") or "?"),
        ("time", prov.get("time") or "?"),
        ("versions", json.dumps(prov.get("versions", {}))),
    ]
    rows = "".join(f"<tr><td>{escape(k)}</td><td style='text-align:left'>{escape(v)}</td></tr>" for k, v in items)
    config = json.dumps(manifest.get("config", {}), indent=2)
    return f"<table>{rows}</table><details><summary>model config</summary><pre>{escape(config)}</pre></details>"


def _thresholds_html(run: RunFolder) -> str:
    path = run.thresholds
    if not path.is_file():
        return ""
    t = read_json(path)
    classes = sorted(set(t["image"]["per_class"]) | set(t["pixel"]["per_class"]))
    fmt = lambda v: "n/a" if v is None else f"{v:.6g}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{escape(c)}</td><td>{fmt(t['image']['per_class'].get(c))}</td>"
        f"<td>{fmt(t['pixel']['per_class'].get(c))}</td></tr>"
        for c in classes
    )
    rows += (
        f"<tr class='mean'><td>overall</td><td>{fmt(t['image']['overall'])}</td>"
        f"<td>{fmt(t['pixel']['overall'])}</td></tr>"
    )
    return (
        "<h2>Decision thresholds (F1-max)</h2><p class='note'>Anomalous = score &ge; threshold; "
        f"image pooling {escape(t['image_pooling'])}. <code>test.py --data_set folder --threshold_from "
        f"{escape(run)}</code> applies them to unlabelled images.</p>"
        f"<table><tr><th>class</th><th>image score</th><th>pixel score</th></tr>{rows}</table>"
    )


def build_report(
    run: str | Path, protocol: str | None = None, gallery_size: int = 8, dataset: str | None = None
) -> Path:
    """Write ``report.html`` (and its ``report/`` folder) in the run folder ``run``; returns its path.

    ``protocol``: the row(s) beside the paper's (None: legacy where the run has it, else official;
    "both": both); ``dataset``: whose published row (default: the run's data set).
    """
    run = run_dir(run)
    if gallery_size < 1:
        raise UserError(f"--gallery_size {gallery_size}: must be at least 1")
    rows = read_scores(run)
    metrics = read_metrics(run)
    curves = read_json(run.curves)["classes"] if run.curves.is_file() else {}
    dataset = dataset or dataset_of(run)
    body = [
        f"<h1>Test run {escape(run.root.resolve().name)}</h1>",
        f"<p class='note'>{len(rows)} images in {len({r['class'] for r in rows})} classes; "
        f"per-image scores: <a href='{_url(run.relative(run.scores))}'>{escape(run.SCORES)}</a>"
        + (f", metrics: <a href='{_url(run.relative(run.metrics_json))}'>{escape(run.METRICS)}</a>" if metrics else "")
        + ".</p>",
    ]

    if metrics:
        body.append("<h2>Metrics (percent)</h2>")
        for p, res in metrics.items():
            body.append(md_table_html(format_table(res, f"{p} protocol")))
        key = dict(ALIASES).get(dataset or "", dataset)
        if key in PAPER_RESULTS:
            means = paper_means(metrics, protocol)
            body.append(f"<h3>Mean beside the paper's row ({escape(key)})</h3>")
            body.append(
                "<p class='note'>The paper's numbers come from the DiAD/VLMDiff metric code (legacy "
                "protocol); a row of another protocol is not a like-for-like comparison.</p>"
            )
            body.append(md_table_html(paper_comparison(means, key)))

    if curves:
        body.append(
            "<h2>Curves</h2><p class='note'>Image ROC and PR, image-score histograms, pixel ROC and PR "
            "and the PRO curve (area to the dashed FPR limit) per class, official protocol; the mean "
            "figure averages the class curves on a common axis.</p>"
        )
        scores = np.array([float(r["image_score"]) for r in rows])
        labels = np.array([int(r["label"]) if r["label"] in ("0", "1") else -1 for r in rows])
        overall = read_json(run.thresholds)["image"]["overall"] if run.thresholds.is_file() else None
        mean_row = metrics.get("official", next(iter(metrics.values())))["mean"] if metrics else {}
        if "official" not in (metrics or {}):
            mean_row = {k: None for k in METRICS}  # the curves are official; legacy values would mislabel them
        fig = plots.save_figure(plots.mean_figure(curves, mean_row, scores, labels, overall), run.curves_figure("mean"))
        body.append(
            f"<h3>mean</h3><img class='curves' src='{_url(run.relative(fig))}' alt='curves, mean over classes'>"
        )
        for cls, c in curves.items():
            sel = np.array([r["class"] == cls for r in rows])
            path = run.curves_figure(cls)
            plots.save_figure(plots.class_figure(cls, c, scores[sel], labels[sel]), path)
            body.append(
                f"<h3>{escape(cls)}</h3>"
                f"<img class='curves' src='{_url(run.relative(path))}' alt='curves of {escape(cls)}'>"
            )

    body.append(_thresholds_html(run))
    body.append(f"<h2>Galleries ({gallery_size} per kind and class)</h2>")
    record = read_json(run.thresholds) if run.thresholds.is_file() else None
    image_thresholds = record["image"]["per_class"] if record else {}
    for cls, kinds in galleries(rows, gallery_size, image_thresholds).items():
        wanted = list({r["id"]: r for g in kinds.values() for r in g}.values())
        display = (curves.get(cls) or {}).get("display_range")
        pictures, display = gallery_pictures(run, cls, wanted, tuple(display) if display else None)
        body.append(f"<h3>{escape(cls)}</h3>")
        assets = run.relative(run.report_assets) + "/"
        if any(p.startswith(assets) for p in pictures.values()):
            lo, hi = display
            body.append(
                f"<p class='note'>Pictures drawn from the stored maps: input | anomaly map | overlay "
                f"| ground truth; map colours ('jet', blue to red) span {lo:.4g} to {hi:.4g} for every "
                "image of the class. <code>test.py --save_visuals</code> gives titled strips.</p>"
            )
        for kind, chosen in kinds.items():
            body.append(f"<h4>{escape(kind)}</h4>")
            if not chosen:
                body.append("<p class='note'>none</p>")
                continue
            body.append("<div class='gallery'>")
            for r in chosen:
                pic = pictures.get(r["id"])
                decision = f", {r['decision']}" if r.get("decision") else ""
                cap = f"{escape(r['id'])}: score {float(r['image_score']):.4g}{escape(decision)}"
                img = f"<a href='{_url(pic)}'><img src='{_url(pic)}' alt='{escape(r['id'])}'></a>" if pic else ""
                body.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
            body.append("</div>")

    body.append("<h2>Provenance</h2>" + _provenance(run))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>VLMDiff test run {escape(run.root.resolve().name)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
    write_text(run.report, page)
    return run.report


def compare_page(path: Path, runs: Sequence[RunFolder], table: str) -> None:
    links = "".join(
        f"<li><a href='{_url(relpath(r.report, path.parent))}'>{escape(r)}</a></li>" for r in runs if r.report.is_file()
    )
    write_text(
        path,
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>VLMDiff runs side by side"
        f"</title><style>{CSS}</style></head><body><h1>Runs side by side (mean over classes, percent)</h1>"
        f"{md_table_html(table)}<ul>{links}</ul></body></html>\n",
    )


def relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())
