"""Benchmark of the evaluation: exact AU-PRO speed and peak memory of streamed evaluation.

(a) On the same synthetic 256x256 maps, time the exact, sort-based AU-PRO (which also yields
pixel AUROC/AP/F1-max in the same pass) against two 200-threshold legacy loops that give the same
legacy value: the upstream-style loop (per threshold: binarise every map, label each image's
ground-truth regions with scikit-image, measure the overlap region by region -- the way the
DiAD/VLMDiff metric code works) and the vectorised legacy loop of vlmdiff.evaluation.array_metrics (regions labelled
once, overlaps by bincount). The three are run in turn, ``--repeats`` times, so a change of machine
load hits all of them; the best time of each is reported, with the 1-minute load average.
(b) Write synthetic float16 maps to a temporary MapStore and run a full seven-metric evaluation
streamed from it in a fresh child process per size; report the child's peak RSS (ru_maxrss from
wait4) and time. The class size is fixed while the number of classes grows, so a flat RSS curve
shows that memory does not follow the total; one extra single-class store of twice the class size
shows that it does not follow the class size either.
(c) One class of ``--big_class`` maps (default 20,000, float32 as test.py stores them) evaluated the
way test.py evaluates a run (vlmdiff.evaluation.evaluate.evaluate_run: metrics, curves, thresholds, scores.csv),
in a child process, against the previous in-memory code (the whole class loaded, its negative pixels
sorted: tests/reference_metrics.py) in another child of the same run: peak RSS, seconds and the largest
difference between the two sets of metric values. The in-memory child is skipped when the machine's
available memory is short of its estimate (``--no_in_memory`` skips it always).

    python bench/bench_eval.py             # all three: ~15 GiB of memory, ~6 GiB of temporary disk, 11-30 min
    python bench/bench_eval.py --only big_class         # (c) only
    python bench/bench_eval.py --big_class 2000 --sizes 1000,2000   # smaller: ~2 GiB, ~1 GiB of disk, minutes
    python bench/bench_eval.py --quick                  # a smoke run (seconds)

It prints what the chosen sizes need (memory, temporary disk, rough time) before it starts.

Prints tables and writes JSON to bench/results/eval.json.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import load_average, table, write_results  # noqa: E402
from bench.synthetic_maps import SIZE, linked_store, synthetic_batch, write_run, write_store  # noqa: E402
from bench.upstream_aupro import upstream_style_legacy_aupro  # noqa: E402
from vlmdiff.evaluation import array_metrics, metrics  # noqa: E402
from vlmdiff.evaluation.map_store import MapStore  # noqa: E402
from vlmdiff.evaluation.run_folder import RunFolder  # noqa: E402


def bench_aupro(n_images: int, seed: int = 0, repeats: int = 1, upstream_loop: bool = True) -> dict:
    """Best-of-``repeats`` seconds of exact AU-PRO, the vectorised and the upstream-style legacy loops."""
    rng = np.random.default_rng(seed)
    maps, masks = synthetic_batch(rng, n_images)
    maps = maps.astype(np.float16).astype(np.float32)  # stored precision: many ties, as in practice
    gt = masks > 0
    array_metrics.pixel_metrics(maps[:4], gt[:4])  # warm-up: first-call costs are not what is measured
    array_metrics.legacy_aupro(maps[:4], gt[:4])
    methods = {
        "exact": lambda: array_metrics.pixel_metrics(maps, gt)["aupro"],
        "legacy_vectorised": lambda: array_metrics.legacy_aupro(maps, gt),
    }
    if upstream_loop:
        upstream_style_legacy_aupro(maps[:2], gt[:2], num_thresholds=4)
        methods["legacy_upstream_loop"] = lambda: upstream_style_legacy_aupro(maps, gt)
    times: dict[str, list[float]] = {k: [] for k in methods}
    values: dict[str, float] = {}
    loads = [load_average()]
    for _ in range(repeats):  # interleaved: every repeat runs each method once
        for name, fn in methods.items():
            t0 = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - t0)
            loads.append(load_average())
    best = {k: min(v) for k, v in times.items()}
    out = {
        "n_images": n_images,
        "pixels": int(maps.size),
        "repeats": repeats,
        "times_s": times,
        "load_average_1min": loads,
        "exact_s": best["exact"],
        "legacy_s": best["legacy_vectorised"],
        "speedup": best["legacy_vectorised"] / best["exact"],
        "aupro_exact": values["exact"],
        "aupro_legacy": values["legacy_vectorised"],
    }
    if upstream_loop:
        out.update(
            {
                "legacy_upstream_loop_s": best["legacy_upstream_loop"],
                "speedup_vs_upstream_loop": best["legacy_upstream_loop"] / best["exact"],
                "aupro_legacy_upstream_loop": values["legacy_upstream_loop"],
            }
        )
    return out


MIB_PER_MAP = {"float32": 320 / 1024, "float16": 192 / 1024}  # one stored 256x256 map with its mask, on disk
IN_MEMORY_MIB_PER_MAP = 0.75  # the in-memory baseline of (c): maps, masks, ground truth, sorted negatives
STREAMED_MIB = 1536  # the streamed evaluation stays below this whatever the size


def needs(args: argparse.Namespace, parts: list[str], sizes: list[int]) -> str:
    """What the run will take: peak memory, temporary disk and a rough time (2 cores, measured once)."""
    disk, memory, seconds = 0.0, float(STREAMED_MIB), 30.0
    if "aupro" in parts:
        seconds += sum(n * (0.005 if args.no_upstream_loop else 0.11) for n in args.n_images) * args.repeats
    if "memory_curve" in parts:
        maps = max(sizes) + 2 * args.class_size
        disk = max(disk, maps * MIB_PER_MAP["float16"])
        seconds += maps * 0.005 + sum(sizes) * 0.004
    if "big_class" in parts:
        disk = max(disk, args.big_class * MIB_PER_MAP[args.big_dtype])
        seconds += args.big_class * 0.012  # writing the maps, evaluating them streamed
        if not args.no_in_memory:
            memory = max(
                memory, IN_MEMORY_MIB_PER_MAP * args.big_class * (1.0 if args.big_dtype == "float32" else 0.75)
            )
            seconds += args.big_class * 0.005
    return (
        f"this run needs about {memory / 1024:.1f} GiB of memory, {disk / 1024:.1f} GiB of temporary disk "
        f"(in {args.tmp or tempfile.gettempdir()}) and roughly {seconds / 60:.0f} minutes on 2 idle cores; "
        "smaller: --big_class 2000 --sizes 1000,2000, --no_in_memory, --only PART, or --quick"
    )


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script in a child process; return its JSON answer and peak RSS in MiB."""
    return common.run_child(Path(__file__).resolve(), args)


def child_eval(store_dir: str) -> None:
    """Child mode: stream a full official evaluation from the store, print JSON on stdout."""
    store = MapStore(store_dir)
    t0 = time.perf_counter()
    sources = list(store.class_sources())
    res = metrics.evaluate_stream(sources)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "n_maps": sum(len(s) for _, s in sources),
                "classes": len(res["per_class"]),
                "mean": res["mean"],
            }
        )
    )


def child_run(run_dir: str, protocol: str) -> None:
    """Child mode: evaluate the run folder as test.py does (streamed), print JSON on stdout."""
    from vlmdiff.evaluation.evaluate import evaluate_run

    t0 = time.perf_counter()
    res = evaluate_run(Path(run_dir), protocol, "paper")
    print(json.dumps({"seconds": time.perf_counter() - t0, "metrics": res}))


def child_in_memory(run_dir: str, protocol: str) -> None:
    """Child mode: the previous evaluation of a class: loaded whole, then tests/reference_metrics.py."""
    from tests import reference_metrics

    t0 = time.perf_counter()
    out: dict = {}
    for cls, arrays in MapStore(RunFolder(run_dir).maps).iter_classes():
        rows = reference_metrics.evaluate_class(cls, arrays["maps"], arrays["masks"], protocol, "paper", 0.0)
        for p, row in rows.items():
            out.setdefault(p, {"per_class": {}})["per_class"][cls] = row
        del arrays
    print(json.dumps({"seconds": time.perf_counter() - t0, "metrics": out}))


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024.0


def bench_big_class(args: argparse.Namespace) -> dict:
    """(c): the streamed evaluation of one large class against the in-memory one, in one run."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_big_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        run = write_run(tmp / "run", args.big_class, args.big_dtype, seed=3)
        size_gib = sum(f.stat().st_size for f in RunFolder(run).maps.rglob("*.npz")) / 2**30
        print(
            f"\n(c) one class of {args.big_class} {args.big_dtype} maps of {SIZE}x{SIZE} ({size_gib:.1f} GiB on disk, "
            f"written in {time.perf_counter() - t0:.0f} s), protocol {args.protocol}",
            flush=True,
        )
        out = {"maps": args.big_class, "store_dtype": args.big_dtype, "store_gib": size_gib, "protocol": args.protocol}
        res, rss = run_child(["--_child_run", str(run), "--protocol", args.protocol])
        out["streamed"] = {"seconds": res["seconds"], "peak_rss_mib": rss, "load_average_1min": load_average()}
        rows = [["streamed (vlmdiff.evaluation.evaluate.evaluate_run)", f"{rss:.0f}", f"{res['seconds']:.0f}"]]
        # the in-memory code holds maps, masks, ground truth and the sorted negatives: ~0.75 MiB a 256x256 map
        need = 0.75 * args.big_class * (1.0 if args.big_dtype == "float32" else 0.75) + 1024
        if args.no_in_memory or available_mib() < need:
            print(
                f"in-memory evaluation skipped: needs ~{need:.0f} MiB, {available_mib():.0f} MiB available", flush=True
            )
        else:
            ref, ref_rss = run_child(["--_child_in_memory", str(run), "--protocol", args.protocol])
            diffs = [
                abs(a - b)
                for p, sub in ref["metrics"].items()
                for cls, row in sub["per_class"].items()
                for k, a in row.items()
                if a is not None
                for b in [res["metrics"][p]["per_class"][cls][k]]
            ]
            out["in_memory"] = {
                "seconds": ref["seconds"],
                "peak_rss_mib": ref_rss,
                "max_metric_difference": max(diffs),
                "load_average_1min": load_average(),
            }
            rows.append(
                ["previous in-memory code (tests/reference_metrics.py)", f"{ref_rss:.0f}", f"{ref['seconds']:.0f}"]
            )
        print(table(["evaluation of the class", "peak RSS MiB", "seconds"], rows))
        if "in_memory" in out:
            print(
                f"largest difference between the two sets of metric values: "
                f"{out['in_memory']['max_metric_difference']:.2e}"
            )
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--n_images",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[40, 500],
        help="images for the AU-PRO timing (a), comma-separated sizes",
    )
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the AU-PRO timing (a)")
    p.add_argument("--no_upstream_loop", action="store_true", help="skip the (slow) upstream-style legacy loop in (a)")
    p.add_argument("--sizes", default="1000,5000,20000", help="total map counts for the memory curve (b)")
    p.add_argument("--class_size", type=int, default=1000, help="maps per class in (b)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval.json"))
    p.add_argument("--big_class", type=int, default=20000, help="maps in the single class of (c)")
    p.add_argument("--big_dtype", default="float32", choices=("float32", "float16"), help="map storage in (c)")
    p.add_argument("--protocol", default="official", choices=("official", "legacy", "both"), help="metrics of (c)")
    p.add_argument("--no_in_memory", action="store_true", help="skip the previous in-memory evaluation in (c)")
    p.add_argument("--only", default=None, choices=("aupro", "memory_curve", "big_class"), help="run one part only")
    p.add_argument("--tmp", default=None, help="folder for the temporary stores (default: system temp)")
    p.add_argument("--_child_run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child_in_memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child_eval", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child_idle", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args._child_eval:
        child_eval(args._child_eval)
        return {}
    if args._child_run:
        child_run(args._child_run, args.protocol)
        return {}
    if args._child_in_memory:
        child_in_memory(args._child_in_memory, args.protocol)
        return {}
    if args._child_idle:  # imports only: the RSS floor of a child
        print(json.dumps({"seconds": 0.0}))
        return {}
    if args.quick:
        args.n_images, args.sizes, args.class_size, args.big_class = [20], "100,300", 100, 300
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % args.class_size for s in sizes):
        raise SystemExit(f"--sizes must be multiples of --class_size {args.class_size}")
    parts = [args.only] if args.only else ["aupro", "memory_curve", "big_class"]
    print(needs(args, parts, sizes), flush=True)
    _, idle_rss = run_child(["--_child_idle"])
    print(f"child RSS after imports alone: {idle_rss:.0f} MiB", flush=True)
    result: dict = {
        "child_idle_rss_mib": idle_rss,
        "settings": {
            "n_images": args.n_images,  # sizes of (a)
            "sizes": sizes,
            "class_size": args.class_size,
            "map_size": SIZE,
            "big_class": args.big_class,
            "big_dtype": args.big_dtype,
            "protocol": args.protocol,
        },
    }
    if "aupro" in parts:
        timings = [part_aupro(args, n) for n in args.n_images]
        result["aupro_timing"] = timings[-1]  # the largest size
        result["aupro_timing_by_size"] = {str(t["n_images"]): t for t in timings}
    if "memory_curve" in parts:
        result["memory_curve"] = part_memory_curve(args, sizes)
    if "big_class" in parts:
        result["big_class"] = bench_big_class(args)
    write_results("eval", result, args.output)
    print(f"\nwrote {args.output}")
    return result


def part_aupro(args: argparse.Namespace, n_images: int) -> dict:
    """(a) at ``n_images`` maps."""
    print(
        f"\n(a) exact AU-PRO vs 200-threshold legacy loops, {n_images} maps of {SIZE}x{SIZE}, "
        f"best of {args.repeats}, load {load_average():.2f}",
        flush=True,
    )
    a = bench_aupro(n_images, repeats=args.repeats, upstream_loop=not args.no_upstream_loop)
    rows = [
        ["exact (all 4 pixel metrics)", a["exact_s"], "1x", f"{a['aupro_exact']:.4f} (official)"],
        [
            "legacy, one pass (vlmdiff.evaluation.array_metrics.legacy_aupro)",
            a["legacy_s"],
            f"{a['speedup']:.1f}x",
            f"{a['aupro_legacy']:.4f}",
        ],
    ]
    if "legacy_upstream_loop_s" in a:
        rows.append(
            [
                "legacy, upstream-style loop (skimage labels per threshold)",
                a["legacy_upstream_loop_s"],
                f"{a['speedup_vs_upstream_loop']:.1f}x",
                f"{a['aupro_legacy_upstream_loop']:.4f}",
            ]
        )
    print(table(["AU-PRO computation", "seconds", "time / exact", "AU-PRO"], rows))
    print(f"load average during (a): {min(a['load_average_1min']):.2f}..{max(a['load_average_1min']):.2f}", flush=True)
    return a


def part_memory_curve(args: argparse.Namespace, sizes: list[int]) -> list[dict]:
    """(b)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_", dir=args.tmp))
    rows = []
    try:
        t0 = time.perf_counter()
        write_store(tmp / "master", max(sizes) // args.class_size, args.class_size, seed=1)
        write_store(tmp / "big_class", 1, 2 * args.class_size, seed=2)
        print(
            f"\n(b) wrote {max(sizes) + 2 * args.class_size} float16 maps in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        configs = [
            (s // args.class_size, args.class_size, linked_store(tmp / "master", tmp / f"n{s}", s // args.class_size))
            for s in sizes
        ]
        configs.append((1, 2 * args.class_size, tmp / "big_class"))
        print("| maps | classes | largest class | peak RSS MiB | eval s | maps/s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n_classes, class_size, store_dir in configs:
            res, rss = run_child(["--_child_eval", str(store_dir)])
            row = {
                "maps": res["n_maps"],
                "classes": n_classes,
                "largest_class": class_size,
                "peak_rss_mib": rss,
                "eval_s": res["seconds"],
                "mean_aupro": res["mean"]["aupro"],
            }
            rows.append(row)
            print(
                f"| {row['maps']} | {n_classes} | {class_size} | {rss:.0f} | {row['eval_s']:.1f} "
                f"| {row['maps'] / row['eval_s']:.0f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
