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
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.cli import HelpFormatter, run_main, setup_logging
from utils.errors import UserError
from utils.io import write_json
from vlmdiff.data.registry import ALIASES, dataset_choices
from vlmdiff.evaluation.metric_table import (
    HEADERS,
    METRICS,
    PAPER_RESULTS,
    format_table,
    paper_comparison,
    paper_means,
)
from vlmdiff.evaluation.run_folder import RunFolder
from vlmdiff.evaluation.run_results import average, dataset_of, read_metrics, run_dir

_DATASETS = dataset_choices(folder=False)  # the paper's datasets and their aliases (real_iad)


def comparison_table(runs: Sequence[RunFolder | Path], protocol: str | None) -> str:
    """Markdown table: one row per run and protocol (the mean over classes), side by side."""
    lines = ["| run | protocol | " + " | ".join(HEADERS) + " |", "|---|---|" + "---:|" * len(HEADERS)]
    for run in runs:
        metrics = read_metrics(run)
        if metrics is None:
            lines.append(f"| {run} | (no metrics: unlabelled) |" + " |" * len(HEADERS))
            continue
        for p, row in paper_means(metrics, protocol).items():
            lines.append(
                f"| {run} | {p} | "
                + " | ".join("nan" if math.isnan(row[k]) else f"{100 * row[k]:.1f}" for k in METRICS)
                + " |"
            )
    return "\n".join(lines)


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
    from vlmdiff.evaluation.report_page import build_report, compare_page  # matplotlib: after parsing

    runs = [run_dir(r) for r in args.runs]
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
        compare_page(Path(args.compare), runs, table)
        print(f"side by side: {args.compare}")
    dataset = args.dataset or dataset_of(runs[0])
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
        if dict(ALIASES).get(dataset, dataset) in PAPER_RESULTS:
            print()
            print(paper_comparison({p: mean}, dataset))
    elif dict(ALIASES).get(dataset, dataset) in PAPER_RESULTS:
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
