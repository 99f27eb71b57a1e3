"""The report of a test run (report.html) and tables across runs (the paper's row, COCO-AD's four parts).

  python -m vlmdiff.evaluation.report results/vlmdiff_mvtec          # (re)build results/vlmdiff_mvtec/report.html
  python -m vlmdiff.evaluation.report results/run_a results/run_b --compare results/a_vs_b.html   # side by side
  python -m vlmdiff.evaluation.report results/coco_p0 results/coco_p1 results/coco_p2 results/coco_p3 --dataset coco \\
      --average --output results/coco_mean.json

Each run folder comes from test.py (which builds its report at the end of an evaluation). The page
is static (it opens from disk, no server): the metric table beside the paper's row, the curves per
class and for the mean, galleries of false alarms, misses and best detections, and the run's
provenance. It is drawn from the files the run wrote (metrics.json, curves.json, thresholds.json,
scores.csv, visuals/); images without a strip are drawn from their stored maps, read for those
images only. The paper's numbers were computed with the DiAD/VLMDiff metric code (the "legacy"
protocol), so the row beside them is the legacy one where the run has it, else the official one,
and every row names its protocol.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from utils.cli import HelpFormatter, run_main, setup_logging
from utils.errors import UserError
from utils.io import atomic_open, read_json, write_json, write_text
from vlmdiff.evaluation import plots
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.metrics import METRICS, PAPER_RESULTS, format_table, paper_comparison, paper_means
from vlmdiff.evaluation.visuals import PANEL_SIZE, class_range, colormap, overlay, visual_path

log = logging.getLogger(__name__)

REPORT = "report.html"
ASSETS = "report"  # folder of the page's figures and gallery images, beside report.html
_HEADERS = ("AU-ROC_I", "AP_I", "F1max_I", "AU-ROC_P", "AP_P", "F1max_P", "AU-PRO")
_DATASETS = sorted(PAPER_RESULTS) + ["real_iad"]


# --------------------------------------------------------------------------- reading a run
def _run_dir(run: str | Path) -> Path:
    path = Path(run)
    if path.is_file() and path.name == "metrics.json":
        path = path.parent
    if not (path / "scores.csv").is_file() and not (path / "metrics.json").is_file():
        raise UserError(f"{run}: not a test run folder (no scores.csv or metrics.json); give test.py's --output_dir")
    return path


def read_scores(run: Path) -> list[dict[str, str]]:
    """The rows of a run's scores.csv (see :data:`evaluate.SCORES_COLUMNS`)."""
    path = run / "scores.csv"
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


def read_metrics(run: str | Path) -> dict[str, Any] | None:
    """``{protocol: {"per_class", "mean"}}`` of a run (None values as NaN), or None for a run without metrics."""
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
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


def read_mean(run: str | Path, protocol: str) -> dict[str, float]:
    """The mean row of ``protocol`` of a run (folder or metrics.json)."""
    metrics = read_metrics(run)
    if metrics is None or protocol not in metrics:
        raise UserError(f"{run} has no '{protocol}' metrics (was test.py run with --metrics_protocol {protocol}?)")
    return metrics[protocol]["mean"]


def average(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}


def _dataset_of(run: Path) -> str | None:
    path = run / "metrics.json"
    if not path.is_file():
        return None
    return read_json(path).get("provenance", {}).get("data_set")


# --------------------------------------------------------------------------- galleries
def galleries(rows: list[dict[str, str]], size: int) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Per class: the ``size`` highest-scoring normal images (false alarms), lowest-scoring anomalous
    images (misses) and highest-scoring anomalous images (best detections); for unlabelled images the
    highest and lowest scores. Ties are broken by image id.
    """
    out: dict[str, dict[str, list[dict[str, str]]]] = {}
    for cls in dict.fromkeys(r["class"] for r in rows):
        mine = sorted((r for r in rows if r["class"] == cls), key=lambda r: r["id"])
        normal = [r for r in mine if r["label"] == "0"]
        anomalous = [r for r in mine if r["label"] == "1"]
        score = lambda r: float(r["image_score"])  # noqa: E731
        if normal or anomalous:
            out[cls] = {
                "false alarms (highest-scoring normal images)": sorted(normal, key=score, reverse=True)[:size],
                "misses (lowest-scoring anomalous images)": sorted(anomalous, key=score)[:size],
                "best detections (highest-scoring anomalous images)": sorted(anomalous, key=score, reverse=True)[:size],
            }
        else:
            out[cls] = {
                "highest scores": sorted(mine, key=score, reverse=True)[:size],
                "lowest scores": sorted(mine, key=score)[:size],
            }
    return out


def _gallery_pictures(
    run: Path, cls: str, wanted: list[dict[str, str]], display_range: tuple[float, float] | None
) -> tuple[dict[str, str], tuple[float, float] | None]:
    """``{id: path relative to run}`` of the picture of each gallery image: its strip when the run has one,
    else panels ``input | anomaly map | overlay [| ground truth]`` put together here from its stored map
    (plain image panels in a JPEG, no matplotlib: a large run draws hundreds). Also returns the colour range
    used."""
    pictures = {
        r["id"]: r["visual_path"] for r in wanted if r.get("visual_path") and (run / r["visual_path"]).is_file()
    }
    missing = [r for r in wanted if r["id"] not in pictures]
    if not missing:
        return pictures, display_range
    stored = MapStore(run / "maps").read_images(cls, [r["id"] for r in missing])
    if not stored:
        return pictures, display_range
    if display_range is None:
        display_range = _range([v["map"] for v in stored.values()])
    lo, hi = display_range
    no_input = 0
    for r in missing:
        if r["id"] not in stored:
            continue
        amap, mask = stored[r["id"]]["map"].astype(np.float32), stored[r["id"]]["mask"]
        image = _input_image(r.get("image_path", ""), amap.shape)
        if image is None:
            no_input += 1
            image = np.full((*amap.shape, 3), 128, np.uint8)
        panels = [image, colormap((amap - lo) / (hi - lo)), overlay(image, amap, display_range)]
        if r["label"] in ("0", "1"):
            panels.append(np.repeat(mask[..., None], 3, axis=-1))
        rel = Path(ASSETS) / "gallery" / visual_path(cls, r["id"]).with_suffix(".jpg")
        with atomic_open(run / rel, "wb") as f:  # JPEG: encoded several times faster than PNG, and smaller
            Image.fromarray(_side_by_side(panels)).save(f, format="JPEG", quality=90)
        pictures[r["id"]] = rel.as_posix()
    if no_input:
        log.warning(
            "class %s: %d gallery images have no readable image file (image_path in scores.csv); "
            "their input panel is grey",
            cls,
            no_input,
        )
    return pictures, display_range


def _side_by_side(panels: list[np.ndarray], size: int = PANEL_SIZE, gap: int = 4) -> np.ndarray:
    """(H,W,3) uint8 panels resized to ``size`` (nearest) and set in a row with white gaps."""
    row = np.full((size, len(panels) * (size + gap) - gap, 3), 255, np.uint8)
    for i, p in enumerate(panels):
        row[:, i * (size + gap) : i * (size + gap) + size] = np.asarray(
            Image.fromarray(p).resize((size, size), Image.NEAREST)
        )
    return row


def _range(maps: list[np.ndarray]) -> tuple[float, float]:
    return class_range(np.stack(maps))


def _input_image(path: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The input image at map size (H, W, 3) uint8; None when the file is not there (any more)."""
    h, w = shape
    if not path or not Path(path).is_file():
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))


# --------------------------------------------------------------------------- the page
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1600px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.mean td{font-weight:bold}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;max-width:100%}
.gallery img{max-width:100%;border:1px solid #ccc}figcaption{font-size:.8em}
img.curves{max-width:100%}pre{background:#f6f6f6;padding:.5em;overflow:auto;max-height:30em}
.note{color:#555;font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _url(path: str | Path) -> str:
    """A relative file path as an attribute value: percent-encoded (ids may hold '#', '%', '?'), then escaped."""
    return _e(quote(Path(path).as_posix()))


def _md_table_html(md: str) -> str:
    """A markdown table (as :mod:`metrics` writes them) as an HTML table; '### ' lines become captions."""
    out, rows = [], []
    for line in md.splitlines():
        if line.startswith("### "):
            out.append(f"<h3>{_e(line[4:])}</h3>")
        elif line.startswith("|") and not set(line) <= set("|-:"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    if rows:
        head, body = rows[0], rows[1:]
        out.append("<table><tr>" + "".join(f"<th>{_e(c)}</th>" for c in head) + "</tr>")
        for r in body:
            cls = ' class="mean"' if r[0] == "mean" else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def _provenance(run: Path) -> str:
    manifest = read_json(run / "manifest.json") if (run / "manifest.json").is_file() else {}
    prov = read_json(run / "metrics.json").get("provenance", {}) if (run / "metrics.json").is_file() else {}
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
    rows = "".join(f"<tr><td>{_e(k)}</td><td style='text-align:left'>{_e(v)}</td></tr>" for k, v in items)
    config = json.dumps(manifest.get("config", {}), indent=2)
    return f"<table>{rows}</table><details><summary>model config</summary><pre>{_e(config)}</pre></details>"


def _thresholds_html(run: Path) -> str:
    path = run / "thresholds.json"
    if not path.is_file():
        return ""
    t = read_json(path)
    classes = sorted(set(t["image"]["per_class"]) | set(t["pixel"]["per_class"]))
    fmt = lambda v: "n/a" if v is None else f"{v:.6g}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{_e(c)}</td><td>{fmt(t['image']['per_class'].get(c))}</td>"
        f"<td>{fmt(t['pixel']['per_class'].get(c))}</td></tr>"
        for c in classes
    )
    rows += (
        f"<tr class='mean'><td>overall</td><td>{fmt(t['image']['overall'])}</td>"
        f"<td>{fmt(t['pixel']['overall'])}</td></tr>"
    )
    return (
        "<h2>Decision thresholds (F1-max)</h2><p class='note'>Anomalous = score &ge; threshold; "
        f"image pooling {_e(t['image_pooling'])}. <code>test.py --data_set folder --threshold_from "
        f"{_e(run)}</code> applies them to unlabelled images.</p>"
        f"<table><tr><th>class</th><th>image score</th><th>pixel score</th></tr>{rows}</table>"
    )


def build_report(
    run: str | Path, protocol: str | None = None, gallery_size: int = 8, dataset: str | None = None
) -> Path:
    """Write ``report.html`` (and its ``report/`` folder) in the run folder ``run``; returns its path.

    ``protocol``: the row(s) beside the paper's (None: legacy where the run has it, else official;
    "both": both); ``dataset``: whose published row (default: the run's data set).
    """
    run = _run_dir(run)
    if gallery_size < 1:
        raise UserError(f"--gallery_size {gallery_size}: must be at least 1")
    rows = read_scores(run)
    metrics = read_metrics(run)
    curves_path = run / "curves.json"
    curves = read_json(curves_path)["classes"] if curves_path.is_file() else {}
    dataset = dataset or _dataset_of(run)
    assets = run / ASSETS
    body = [
        f"<h1>Test run {_e(run.resolve().name)}</h1>",
        f"<p class='note'>{len(rows)} images in {len({r['class'] for r in rows})} classes; "
        f"per-image scores: <a href='scores.csv'>scores.csv</a>"
        + (", metrics: <a href='metrics.json'>metrics.json</a>" if metrics else "")
        + ".</p>",
    ]

    if metrics:
        body.append("<h2>Metrics (percent)</h2>")
        for p, res in metrics.items():
            body.append(_md_table_html(format_table(res, f"{p} protocol")))
        key = {"real_iad": "realiad"}.get(dataset or "", dataset)
        if key in PAPER_RESULTS:
            means = paper_means(metrics, protocol)
            body.append(f"<h3>Mean beside the paper's row ({_e(key)})</h3>")
            body.append(
                "<p class='note'>The paper's numbers come from the DiAD/VLMDiff metric code (legacy "
                "protocol); a row of another protocol is not a like-for-like comparison.</p>"
            )
            body.append(_md_table_html(paper_comparison(means, key)))

    if curves:
        body.append(
            "<h2>Curves</h2><p class='note'>Image ROC and PR, image-score histograms, pixel ROC and PR "
            "and the PRO curve (area to the dashed FPR limit) per class, official protocol; the mean "
            "figure averages the class curves on a common axis.</p>"
        )
        scores = np.array([float(r["image_score"]) for r in rows])
        labels = np.array([int(r["label"]) if r["label"] in ("0", "1") else -1 for r in rows])
        from vlmdiff.evaluation.thresholds import THRESHOLDS

        overall = read_json(run / THRESHOLDS)["image"]["overall"] if (run / THRESHOLDS).is_file() else None
        mean_row = metrics.get("official", next(iter(metrics.values())))["mean"] if metrics else {}
        if "official" not in (metrics or {}):
            mean_row = {k: None for k in METRICS}  # the curves are official; legacy values would mislabel them
        fig = plots.save_figure(
            plots.mean_figure(curves, mean_row, scores, labels, overall), assets / "curves" / "mean.png"
        )
        body.append(
            f"<h3>mean</h3><img class='curves' src='{_url(fig.relative_to(run))}' alt='curves, mean over classes'>"
        )
        for cls, c in curves.items():
            sel = np.array([r["class"] == cls for r in rows])
            path = assets / "curves" / visual_path(cls, cls).name
            plots.save_figure(plots.class_figure(cls, c, scores[sel], labels[sel]), path)
            body.append(
                f"<h3>{_e(cls)}</h3><img class='curves' src='{_url(path.relative_to(run))}' alt='curves of {_e(cls)}'>"
            )

    body.append(_thresholds_html(run))
    body.append(f"<h2>Galleries ({gallery_size} per kind and class)</h2>")
    for cls, kinds in galleries(rows, gallery_size).items():
        wanted = list({r["id"]: r for g in kinds.values() for r in g}.values())
        display = (curves.get(cls) or {}).get("display_range")
        pictures, display = _gallery_pictures(run, cls, wanted, tuple(display) if display else None)
        body.append(f"<h3>{_e(cls)}</h3>")
        if any(p.startswith(ASSETS) for p in pictures.values()):
            lo, hi = display
            body.append(
                f"<p class='note'>Pictures drawn from the stored maps: input | anomaly map | overlay "
                f"| ground truth; map colours ('jet', blue to red) span {lo:.4g} to {hi:.4g} for every "
                "image of the class. <code>test.py --save_visuals</code> gives titled strips.</p>"
            )
        for kind, chosen in kinds.items():
            body.append(f"<h4>{_e(kind)}</h4>")
            if not chosen:
                body.append("<p class='note'>none</p>")
                continue
            body.append("<div class='gallery'>")
            for r in chosen:
                pic = pictures.get(r["id"])
                decision = f", {r['decision']}" if r.get("decision") else ""
                cap = f"{_e(r['id'])}: score {float(r['image_score']):.4g}{_e(decision)}"
                img = f"<a href='{_url(pic)}'><img src='{_url(pic)}' alt='{_e(r['id'])}'></a>" if pic else ""
                body.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
            body.append("</div>")

    body.append("<h2>Provenance</h2>" + _provenance(run))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>VLMDiff test run {_e(run.resolve().name)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
    write_text(run / REPORT, page)
    return run / REPORT


def comparison_table(runs: Sequence[Path], protocol: str | None) -> str:
    """Markdown table: one row per run and protocol (the mean over classes), side by side."""
    lines = ["| run | protocol | " + " | ".join(_HEADERS) + " |", "|---|---|" + "---:|" * len(_HEADERS)]
    for run in runs:
        metrics = read_metrics(run)
        if metrics is None:
            lines.append(f"| {run} | (no metrics: unlabelled) |" + " |" * len(_HEADERS))
            continue
        for p, row in paper_means(metrics, protocol).items():
            lines.append(
                f"| {run} | {p} | "
                + " | ".join("nan" if math.isnan(row[k]) else f"{100 * row[k]:.1f}" for k in METRICS)
                + " |"
            )
    return "\n".join(lines)


def _compare_page(path: Path, runs: Sequence[Path], table: str) -> None:
    links = "".join(
        f"<li><a href='{_url(_relpath(r / REPORT, path.parent))}'>{_e(r)}</a></li>"
        for r in runs
        if (r / REPORT).is_file()
    )
    write_text(
        path,
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>VLMDiff runs side by side"
        f"</title><style>{_CSS}</style></head><body><h1>Runs side by side (mean over classes, percent)</h1>"
        f"{_md_table_html(table)}<ul>{links}</ul></body></html>\n",
    )


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target.resolve(), start.resolve())


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlmdiff.evaluation.report", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("runs", nargs="+", help="test.py output folders (or their metrics.json files)")
    p.add_argument(
        "--dataset",
        default=None,
        choices=_DATASETS,
        help="whose published row to print beside ours (default: each run's data set)",
    )
    p.add_argument(
        "--protocol",
        "--metrics_protocol",
        default=None,
        choices=("official", "legacy", "both"),
        help="our row(s) beside the paper's (default: legacy, the paper's protocol, where the run "
        "has it, else official; each row labelled)",
    )
    p.add_argument("--gallery_size", type=int, default=8, help="images per gallery (false alarms, misses, detections)")
    p.add_argument("--no_html", action="store_true", help="only print the tables; build no report.html")
    p.add_argument(
        "--compare",
        default=None,
        metavar="HTML",
        help="with several runs: also write their side-by-side table as this static page (default: none)",
    )
    p.add_argument(
        "--average",
        action="store_true",
        help="average the runs' mean rows (COCO-AD's result is the mean over its four parts)",
    )
    p.add_argument(
        "--output", default=None, help="with --average: write the averaged row as JSON (default: print only)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = [_run_dir(r) for r in args.runs]
    if args.output and not args.average:
        raise UserError("--output writes the averaged row: add --average")
    out: dict[str, Any] = {"reports": []}
    if not args.no_html:
        for run in runs:
            out["reports"].append(build_report(run, args.protocol, args.gallery_size, args.dataset))
            print(f"report: {out['reports'][-1]}")
    table = comparison_table(runs, args.protocol)
    print(table)
    if args.compare:
        _compare_page(Path(args.compare), runs, table)
        print(f"side by side: {args.compare}")
    dataset = args.dataset or _dataset_of(runs[0])
    if args.average:
        protocol = args.protocol if args.protocol in ("official", "legacy") else None
        chosen = [paper_means(read_metrics(r) or {}, protocol) for r in runs]
        names = {next(iter(c)) for c in chosen}
        if len(names) > 1:
            raise UserError(f"the runs have different protocols ({', '.join(sorted(names))}); pick one with --protocol")
        p = names.pop()
        mean = average([next(iter(c.values())) for c in chosen])
        print()
        print(format_table({"per_class": {}, "mean": mean}, f"{p} protocol, mean of {len(runs)} runs"))
        out["mean"] = mean
        if args.output:
            write_json(args.output, {"protocol": p, "runs": [str(r) for r in runs], "mean": mean})
        if dataset in PAPER_RESULTS or dataset == "real_iad":
            print()
            print(paper_comparison({p: mean}, dataset))
    elif dataset in PAPER_RESULTS or dataset == "real_iad":
        for run in runs:
            metrics = read_metrics(run)
            if metrics:
                print()
                print(f"{run} beside the paper ({dataset}):")
                print(paper_comparison(paper_means(metrics, args.protocol), dataset))
    return out


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_main(main))
