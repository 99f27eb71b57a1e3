"""The paper table of a reproduction: our legacy-protocol row beside the paper's, the official row below.

Reads the test runs of one table (one run; COCO-AD: the four parts, averaged) and writes, into the
output folder, ``paper_table.md``, ``paper_table.csv`` and ``paper_table.html``:

- the mean over classes: the paper's row (its numbers come from the DiAD/VLMDiff metric code, the
  legacy protocol), ours under the legacy protocol (like for like) and ours under the official, exact
  protocol (scikit-learn AUROC/AP, MVTec AU-PRO);
- per class (COCO-AD: per part) both of our rows; the paper publishes means only.

Every row names where its numbers come from: the test run folder, the checkpoint it tested (path,
epoch, size and the digest test.py recorded in the run's manifest.json). The test runs need both
protocols (``test.py --metrics_protocol both``).

  python -m vlmdiff.evaluation.paper_table --dataset mvtec --runs results/mvtec --output runs/reproduce_mvtec
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.io import read_json, write_text
from vlmdiff.data.registry import ALIASES
from vlmdiff.evaluation.metrics import METRICS, PAPER_RESULTS
from vlmdiff.evaluation.report_page import CSS, escape, md_table_html, relpath
from vlmdiff.evaluation.run_folder import RunFolder
from vlmdiff.evaluation.run_results import average, read_metrics

log = logging.getLogger(__name__)

HEADERS = ("AU-ROC_I", "AP_I", "F1max_I", "AU-ROC_P", "AP_P", "F1max_P", "AU-PRO")
NAMES = {"mvtec": "MVTec-AD", "visa": "VisA", "realiad": "Real-IAD", "coco": "COCO-AD"}


@dataclass
class Source:
    """Where one test run's numbers come from."""

    ref: str  # footnote mark, e.g. "[1]"
    run: Path
    checkpoint: str
    epoch: str
    digest: str
    size: int | None

    def text(self) -> str:
        return (
            f"{self.ref} test run {self.run}, checkpoint {self.checkpoint} ({self.epoch}; "
            f"weights sha256 {self.digest}, {self.size if self.size is not None else '?'} bytes)"
        )


def _source(run: Path, ref: str) -> Source:
    manifest = RunFolder(run).manifest
    ckpt = read_json(manifest).get("checkpoint") or {} if manifest.is_file() else {}
    path = str(ckpt.get("path", "?"))
    m = re.search(r"model_epoch=(\d+)", path)
    epoch = f"epoch {int(m.group(1)) + 1} (model_epoch={m.group(1)})" if m else Path(path).name
    digest = ckpt.get("weights_sha256") or ckpt.get("sha256_head_tail") or "?"  # the latter: older manifests
    return Source(ref, run, path, epoch, str(digest), ckpt.get("size"))


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def collect(dataset: str, runs: Sequence[Path]) -> dict[str, Any]:
    """Rows of the table: ``mean`` {row name: (values, source refs)} and ``classes`` [(class, row, values, refs)]."""
    key = dict(ALIASES).get(dataset, dataset)
    if not runs:
        raise UserError("--runs: give at least one test run folder")
    sources = [_source(Path(r), f"[{i + 1}]") for i, r in enumerate(runs)]
    metrics = []
    for run in runs:
        m = read_metrics(run)
        if m is None or not {"legacy", "official"} <= set(m):
            raise UserError(
                f"{run}: needs metrics of both protocols; rerun its evaluation with "
                "test.py ... --run_eval_only --metrics_protocol both"
            )
        metrics.append(m)
    refs = " ".join(s.ref for s in sources)
    mean: dict[str, tuple[dict[str, float], str]] = {}
    if key in PAPER_RESULTS:
        mean["paper (legacy protocol)"] = (PAPER_RESULTS[key], "VLMDiff paper (WACV 2026)")
    label = "mean of the parts" if len(runs) > 1 else "mean over classes"
    for protocol in ("legacy", "official"):
        name = f"ours, {protocol} protocol" + (" (the paper's)" if protocol == "legacy" else " (exact)")
        mean[name] = (average([m[protocol]["mean"] for m in metrics]), f"{label}, {refs}")
    classes: list[tuple[str, str, dict[str, float], str]] = []
    for i, (m, s) in enumerate(zip(metrics, sources, strict=True)):
        for cls in m["legacy"]["per_class"]:
            shown = f"part {i} ({cls})" if len(runs) > 1 else cls
            for protocol in ("legacy", "official"):
                classes.append((shown, protocol, m[protocol]["per_class"][cls], s.ref))
    return {"dataset": key, "mean": mean, "classes": classes, "sources": sources}


def markdown(table: dict[str, Any]) -> str:
    name = NAMES.get(table["dataset"], table["dataset"])
    head = "| " + " | ".join(HEADERS) + " |"
    rule = "---:|" * len(HEADERS)
    lines = [
        f"### {name}: mean (percent)",
        "",
        f"| row {head} from |",
        f"|---|{rule}---|",
    ]
    for row, (values, src) in table["mean"].items():
        lines.append(f"| {row} | " + " | ".join(_pct(values[k]) for k in METRICS) + f" | {src} |")
    lines += [
        "",
        "The paper's numbers come from the DiAD/VLMDiff metric code (the legacy protocol): compare them with our "
        "legacy row. The official row is the exact computation (scikit-learn AUROC/AP, MVTec AD AU-PRO).",
        "",
        f"### {name}: per {'part' if len(table['sources']) > 1 else 'class'} (percent)",
        "",
        f"| class | protocol {head} from |",
        f"|---|---|{rule}---|",
    ]
    for cls, protocol, values, ref in table["classes"]:
        lines.append(f"| {cls} | {protocol} | " + " | ".join(_pct(values[k]) for k in METRICS) + f" | {ref} |")
    lines += ["", "Sources:", ""] + [f"- {s.text()}" for s in table["sources"]]
    return "\n".join(lines) + "\n"


def csv_text(table: dict[str, Any]) -> str:
    by_ref = {s.ref: s for s in table["sources"]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "table", "class", "row", *METRICS, "runs", "checkpoints", "checkpoint_sha256", "epochs"])

    def prov(refs: str) -> list[str]:
        chosen = [by_ref[r] for r in re.findall(r"\[\d+\]", refs)]
        return [";".join(str(getattr(s, k)) for s in chosen) for k in ("run", "checkpoint", "digest", "epoch")]

    for row, (values, src) in table["mean"].items():
        w.writerow([table["dataset"], "mean", "", row, *(values[k] for k in METRICS), *prov(src)])
    for cls, protocol, values, ref in table["classes"]:
        w.writerow([table["dataset"], "class", cls, protocol, *(values[k] for k in METRICS), *prov(ref)])
    return buf.getvalue()


def html(table: dict[str, Any], md: str, output: Path) -> str:
    parts = md.split("\n\n")
    body = [f"<h1>Paper table: {escape(NAMES.get(table['dataset'], table['dataset']))}</h1>"]
    for chunk in parts:
        if chunk.lstrip().startswith(("###", "|")):
            body.append(md_table_html(chunk))
        elif chunk.startswith("- "):
            items = []
            for s in table["sources"]:
                link = RunFolder(s.run).report
                a = f" (<a href='{escape(relpath(link, output))}'>report</a>)" if link.is_file() else ""
                items.append(f"<li>{escape(s.text())}{a}</li>")
            body.append("<ul>" + "".join(items) + "</ul>")
        elif chunk.strip():
            body.append(f"<p class='note'>{escape(chunk.strip())}</p>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>VLMDiff paper table</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_paper_table(dataset: str, runs: Sequence[Path], output: Path) -> Path:
    """Write paper_table.{md,csv,html} into ``output``; returns the .md path."""
    table = collect(dataset, [Path(r) for r in runs])
    md = markdown(table)
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "paper_table.csv", csv_text(table))
    write_text(output / "paper_table.html", html(table, md, output))
    write_text(output / "paper_table.md", md)  # last: its presence means the table is complete
    log.info("paper table: %s", output / "paper_table.md")
    return output / "paper_table.md"


def main(argv: Sequence[str] | None = None) -> Path:
    from utils.cli import setup_logging

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="mvtec, visa, realiad or coco: whose published row")
    p.add_argument("--runs", nargs="+", required=True, help="test run folders (COCO-AD: the four parts)")
    p.add_argument("--output", required=True, help="folder for paper_table.md/.csv/.html")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    path = write_paper_table(args.dataset, args.runs, Path(args.output))
    print(path.read_text())
    return path


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
