"""Tables across test runs: a run's mean row beside the paper's, and the COCO-AD average of four parts.

  python -m vlmdiff.report results/vlmdiff_mvtec --dataset mvtec
  python -m vlmdiff.report results/coco_p0 results/coco_p1 results/coco_p2 results/coco_p3 --dataset coco \\
      --output results/coco_mean.json
With several runs the mean rows are averaged (COCO-AD's result is the mean over its four parts).
Each run folder (or metrics.json file) comes from test.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from utils.cli import HelpFormatter, run_main
from utils.errors import UserError
from utils.io import read_json, write_json
from vlmdiff.metrics import METRICS, PAPER_RESULTS, compare_to_paper, format_table


def read_mean(run: str | Path, protocol: str) -> dict[str, float]:
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
    data = read_json(path)
    try:
        row = data["metrics"][protocol]["mean"]
    except (KeyError, TypeError):
        raise UserError(f"{path} has no '{protocol}' metrics (was test.py run with --metrics_protocol {protocol}?)") from None
    return {k: math.nan if row.get(k) is None else float(row[k]) for k in METRICS}


def average(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRICS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="test.py output folders or metrics.json files")
    p.add_argument("--dataset", default=None, choices=sorted(PAPER_RESULTS) + ["real_iad"],
                   help="print the paper's published mean row for this dataset beside ours (default: none)")
    p.add_argument("--protocol", "--metrics_protocol", default="official", choices=("official", "legacy"),
                   help="which of the run's metric sets to read (test.py --metrics_protocol)")
    p.add_argument("--output", default=None, help="write the averaged row as JSON (default: print only)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = {str(r): read_mean(r, args.protocol) for r in args.runs}
    mean = average(list(rows.values()))
    table = {"per_class": rows, "mean": mean} if len(rows) > 1 else {"per_class": {}, "mean": mean}
    print(format_table(table, f"{args.protocol} protocol" + (f", mean of {len(rows)} runs" if len(rows) > 1 else "")))
    if args.dataset:
        print()
        print(compare_to_paper(mean, args.dataset))
    if args.output:
        write_json(args.output, {"protocol": args.protocol, "runs": list(rows), "mean": mean})
    return mean


if __name__ == "__main__":
    sys.exit(run_main(main))
