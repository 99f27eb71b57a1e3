"""Synthetic anomaly maps for the evaluation benchmarks: batches of 256x256 maps with elliptic defects, a
MapStore of many classes of them, and a run folder of one class as test.py leaves it after scoring.

Used by bench_eval.py and bench_report.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.run_folder import RunFolder

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


def write_run(root: Path, n_maps: int, dtype: str, seed: int, batch: int = 100) -> Path:
    """A run folder holding one class of ``n_maps`` synthetic maps, as test.py leaves it after scoring."""
    run = RunFolder(root)
    store = MapStore(run.maps, dtype=dtype)
    rng = np.random.default_rng(seed)
    for b in range(0, n_maps, batch):
        n = min(batch, n_maps - b)
        maps, masks = synthetic_batch(rng, n)
        ids = [f"big/img{b + i:06d}" for i in range(n)]
        store.write(f"{b:08d}", ids, ["big"] * n, maps, masks, masks.reshape(n, -1).max(axis=1) > 0, np.zeros(n))
    run.manifest.write_text(json.dumps({"data": {}, "map_dtype": dtype}))
    return root
