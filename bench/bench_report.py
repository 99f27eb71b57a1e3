"""Benchmark of the run report: time and peak memory of building report.html for a large run.

A synthetic test run of ``--n_images`` 256x256 maps (float16, ``--class_size`` per class, the
synthetic maps of bench_eval.py) is written to a temporary folder. Then, each in a fresh child
process (peak RSS from wait4):

1. the evaluation as test.py runs it (``vlmdiff.evaluation.evaluate.evaluate_run``: metrics, curves.json,
   thresholds.json, scores.csv, class by class), for the memory bound the report must stay within;
2. ``python -m vlmdiff.evaluation.report RUN``: the curve figures, the galleries (no strips in this run, so
   every gallery picture is drawn from its stored map) and the page.

Prints a table and writes JSON to bench/results/report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import load_average, table, write_results  # noqa: E402
from bench.synthetic_maps import write_store  # noqa: E402
from vlmdiff.evaluation.run_folder import RunFolder  # noqa: E402


def child_evaluate(run: str) -> None:
    """Child mode: evaluate the run as test.py does; print JSON on stdout."""
    from vlmdiff.evaluation.evaluate import evaluate_run

    t0 = time.perf_counter()
    evaluate_run(Path(run), "official", "paper")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def child_report(run: str, gallery_size: int) -> None:
    """Child mode: build the run's report.html; print JSON on stdout."""
    from vlmdiff.evaluation import report_page

    t0 = time.perf_counter()
    report_page.build_report(Path(run), gallery_size=gallery_size)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_images", type=int, default=20000, help="maps of the synthetic run")
    p.add_argument("--class_size", type=int, default=1000, help="maps per class")
    p.add_argument("--gallery_size", type=int, default=8, help="images per gallery (as test.py's default)")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "report.json"))
    p.add_argument("--tmp", default=None, help="folder for the temporary run (default: system temp)")
    p.add_argument("--_child", default=None, choices=("evaluate", "report", "idle"), help=argparse.SUPPRESS)
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args._child == "evaluate":
        child_evaluate(args._run)
        return {}
    if args._child == "report":
        child_report(args._run, args.gallery_size)
        return {}
    if args._child == "idle":  # imports only: the RSS floor of a child
        import vlmdiff.evaluation.evaluate  # noqa: F401
        import vlmdiff.evaluation.report  # noqa: F401

        print(json.dumps({"seconds": 0.0}))
        return {}
    if args.n_images % args.class_size:
        raise SystemExit(f"--n_images must be a multiple of --class_size {args.class_size}")
    script = Path(__file__).resolve()
    _, idle_rss = common.run_child(script, ["--_child", "idle"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_report_", dir=args.tmp))
    run = RunFolder(tmp / "run")
    try:
        t0 = time.perf_counter()
        write_store(run.maps, args.n_images // args.class_size, args.class_size, seed=1)
        run.manifest.write_text(json.dumps({"checkpoint": None, "note": "synthetic maps"}))
        print(
            f"wrote {args.n_images} float16 maps in {time.perf_counter() - t0:.0f} s; child RSS after imports "
            f"alone: {idle_rss:.0f} MiB; load {load_average():.2f}",
            flush=True,
        )
        ev, ev_rss = common.run_child(script, ["--_child", "evaluate", "--_run", str(run)])
        rep, rep_rss = common.run_child(
            script, ["--_child", "report", "--_run", str(run), "--gallery_size", str(args.gallery_size)]
        )
        sizes = {path.name: path.stat().st_size for path in (run.curves, run.scores, run.report)}
        pictures = len([p for p in run.report_assets.rglob("*") if p.suffix in (".png", ".jpg")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [
        ["evaluation (metrics, curves, thresholds, scores.csv)", ev["seconds"], ev_rss],
        [f"report.html ({pictures} pictures drawn)", rep["seconds"], rep_rss],
    ]
    print(table(["step", "seconds", "peak RSS MiB"], rows))
    print(
        f"curves.json {sizes['curves.json'] / 2**20:.1f} MiB, scores.csv {sizes['scores.csv'] / 2**20:.1f} MiB, "
        f"report.html {sizes['report.html'] / 2**10:.0f} KiB; load {load_average():.2f}"
    )
    result = {
        "n_images": args.n_images,
        "class_size": args.class_size,
        "gallery_size": args.gallery_size,
        "evaluate_s": ev["seconds"],
        "evaluate_peak_rss_mib": ev_rss,
        "report_s": rep["seconds"],
        "report_peak_rss_mib": rep_rss,
        "child_idle_rss_mib": idle_rss,
        "pictures": pictures,
        "file_bytes": sizes,
    }
    write_results("report", result, args.output)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
