"""Benchmark of the evaluation: exact AU-PRO speed and peak memory of streamed evaluation.

(a) On the same synthetic 256x256 maps, time the exact, sort-based AU-PRO (which also yields
pixel AUROC/AP/F1-max in the same pass) against the 200-threshold legacy loop of
vlmdiff.metrics, and check the exact value against the legacy one.
(b) Write synthetic float16 maps to a temporary MapStore and run a full seven-metric evaluation
streamed from it in a fresh child process per size; report the child's peak RSS (ru_maxrss from
wait4) and time. The class size is fixed while the number of classes grows, so a flat RSS curve
shows that memory follows the largest class, not the total; one extra single-class store of twice
the class size shows the dependence on class size.

Prints a table and writes JSON to bench/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.io import write_json  # noqa: E402
from vlmdiff import metrics  # noqa: E402
from vlmdiff.map_store import MapStore  # noqa: E402

SIZE = 256


def synthetic_batch(rng: np.random.Generator, n: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` maps (float32, smooth-ish noise + higher scores on defects) and uint8 masks; half anomalous."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(0, n, 2):  # every other image has 1-3 elliptic defects
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(16, size - 16, 2)
            ry, rx = rng.integers(3, 30, 2)
            masks[i][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 255
    coarse = rng.random((n, size // 8, size // 8), dtype=np.float32)
    maps = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) * 0.6
    maps += rng.random((n, size, size), dtype=np.float32) * 0.4
    maps += (masks > 0) * rng.uniform(0.1, 0.8, size=(n, 1, 1)).astype(np.float32)
    return maps, masks


def bench_aupro(n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    maps, masks = synthetic_batch(rng, n_images)
    maps = maps.astype(np.float16).astype(np.float32)  # stored precision: many ties, as in practice
    gt = masks > 0
    metrics.pixel_metrics(maps[:4], gt[:4])  # warm-up: first-call costs are not what is measured
    metrics.legacy_aupro(maps[:4], gt[:4])
    t0 = time.perf_counter()
    exact = metrics.pixel_metrics(maps, gt)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    legacy = metrics.legacy_aupro(maps, gt)
    t_legacy = time.perf_counter() - t0
    return {"n_images": n_images, "pixels": int(maps.size), "exact_s": t_exact, "legacy_s": t_legacy,
            "speedup": t_legacy / t_exact, "aupro_exact": exact["aupro"], "aupro_legacy": legacy}


def write_store(root: Path, n_classes: int, class_size: int, seed: int, batch: int = 100) -> None:
    store = MapStore(root, dtype="float16")
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        for b in range(0, class_size, batch):
            n = min(batch, class_size - b)
            maps, masks = synthetic_batch(rng, n)
            ids = [f"class{c:03d}/img{b + i:06d}" for i in range(n)]
            labels = masks.reshape(n, -1).max(axis=1) > 0
            store.write(f"c{c:03d}_b{b:06d}", ids, [f"class{c:03d}"] * n, maps, masks, labels, np.zeros(n))


def linked_store(master: Path, root: Path, n_classes: int) -> Path:
    """A store made of the first ``n_classes`` class folders of ``master`` (symlinks, no copies)."""
    root.mkdir(parents=True)
    for d in sorted(p for p in master.iterdir() if p.is_dir())[:n_classes]:
        (root / d.name).symlink_to(d, target_is_directory=True)
    return root


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run this script in a child process; return its JSON answer and peak RSS in MiB."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024.0  # Linux: KiB


def child_eval(store_dir: str) -> None:
    """Child mode: stream a full official evaluation from the store, print JSON on stdout."""
    store = MapStore(store_dir)
    t0 = time.perf_counter()
    n = 0

    def items():
        nonlocal n
        for cls, arrays in store.iter_classes():
            n += len(arrays["ids"])
            yield cls, arrays["maps"], arrays["masks"]

    res = metrics.evaluate_stream(items())
    print(json.dumps({"seconds": time.perf_counter() - t0, "n_maps": n, "classes": len(res["per_class"]),
                      "mean": res["mean"]}))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_images", type=int, default=500, help="images for the AU-PRO timing (a)")
    p.add_argument("--sizes", default="1000,5000,20000", help="total map counts for the memory curve (b)")
    p.add_argument("--class_size", type=int, default=1000, help="maps per class in (b)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "eval.json"))
    p.add_argument("--tmp", default=None, help="folder for the temporary stores (default: system temp)")
    p.add_argument("--_child_eval", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child_idle", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args._child_eval:
        child_eval(args._child_eval)
        return {}
    if args._child_idle:  # imports only: the RSS floor of a child
        print(json.dumps({"seconds": 0.0}))
        return {}
    if args.quick:
        args.n_images, args.sizes, args.class_size = 40, "100,300", 100
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % args.class_size for s in sizes):
        raise SystemExit(f"--sizes must be multiples of --class_size {args.class_size}")

    print(f"(a) exact AU-PRO vs 200-threshold legacy loop, {args.n_images} maps of {SIZE}x{SIZE}", flush=True)
    a = bench_aupro(args.n_images)
    print("| maps | pixels | exact (all 4 pixel metrics) s | legacy AU-PRO loop s | speed-up "
          "| AU-PRO exact | AU-PRO legacy |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {a['n_images']} | {a['pixels']:,} | {a['exact_s']:.2f} | {a['legacy_s']:.2f} | {a['speedup']:.1f}x "
          f"| {a['aupro_exact']:.4f} | {a['aupro_legacy']:.4f} |", flush=True)

    _, idle_rss = run_child(["--_child_idle"])
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_", dir=args.tmp))
    rows = []
    try:
        t0 = time.perf_counter()
        write_store(tmp / "master", max(sizes) // args.class_size, args.class_size, seed=1)
        write_store(tmp / "big_class", 1, 2 * args.class_size, seed=2)
        print(f"\n(b) wrote {max(sizes) + 2 * args.class_size} float16 maps in {time.perf_counter() - t0:.0f} s; "
              f"child RSS after imports alone: {idle_rss:.0f} MiB", flush=True)
        configs = [(s // args.class_size, args.class_size,
                    linked_store(tmp / "master", tmp / f"n{s}", s // args.class_size)) for s in sizes]
        configs.append((1, 2 * args.class_size, tmp / "big_class"))
        print("| maps | classes | largest class | peak RSS MiB | eval s | maps/s |")
        print("|---:|---:|---:|---:|---:|---:|")
        for n_classes, class_size, store_dir in configs:
            res, rss = run_child(["--_child_eval", str(store_dir)])
            row = {"maps": res["n_maps"], "classes": n_classes, "largest_class": class_size, "peak_rss_mib": rss,
                   "eval_s": res["seconds"], "mean_aupro": res["mean"]["aupro"]}
            rows.append(row)
            print(f"| {row['maps']} | {n_classes} | {class_size} | {rss:.0f} | {row['eval_s']:.1f} "
                  f"| {row['maps'] / row['eval_s']:.0f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"aupro_timing": a, "memory_curve": rows, "child_idle_rss_mib": idle_rss,
              "settings": {"n_images": args.n_images, "sizes": sizes, "class_size": args.class_size,
                           "map_size": SIZE, "store_dtype": "float16", "protocol": "official"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    write_json(args.output, result)
    print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    main()
