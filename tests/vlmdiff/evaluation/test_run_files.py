"""The files a run folder gives a user reproduce the run: scores.csv with thresholds.json gives its decisions,
the report's misses are the images the run missed."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from utils.io import write_json
from vlmdiff.evaluation.evaluate import evaluate_run
from vlmdiff.evaluation.galleries import MISSES, galleries
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.run_folder import RunFolder


def _run(folder: Path, peaks: dict[str, list[float]], anomalous: dict[str, list[bool]]) -> Path:
    """A run folder whose image ``i`` of class ``c`` has the map maximum ``peaks[c][i]`` (pooling "max")."""
    store = MapStore(folder / "maps", dtype="float32")
    for cls, values in peaks.items():
        n = len(values)
        maps = np.zeros((n, 16, 16), np.float32)
        maps[:, 3, 3] = values
        masks = np.zeros((n, 16, 16), np.uint8)
        masks[np.asarray(anomalous[cls]), 2:5, 2:5] = 255
        ids = [f"{cls}/{i:03d}" for i in range(n)]
        store.write("00000000", ids, [cls] * n, maps, masks, np.asarray(anomalous[cls], np.int8), np.zeros(n))
    write_json(folder / "manifest.json", {"data": {}, "map_dtype": "float32"})
    return folder


def test_scores_csv_and_thresholds_json_reproduce_the_runs_decisions(tmp_path):
    # scores that differ only past the sixth decimal: rounded, the normal image would pass the threshold
    above = float(np.nextafter(np.float32(0.7), np.float32(1)))  # the next float32 above 0.7
    peaks = {"a": [0.1234567, 0.12345671, 0.5, 0.05], "b": [above, 0.7, 0.2, 0.9]}
    anomalous = {"a": [False, True, True, False], "b": [True, False, False, True]}
    run = _run(tmp_path / "run", peaks, anomalous)
    result = evaluate_run(run, "official", "max")["official"]["per_class"]
    with open(run / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    thresholds = json.loads((run / "thresholds.json").read_text())["image"]["per_class"]
    for cls in peaks:
        mine = [r for r in rows if r["class"] == cls]
        decided = np.array([float(r["image_score"]) >= thresholds[cls] for r in mine])  # the documented rule
        truth = np.array([r["label"] == "1" for r in mine])
        assert np.array_equal(decided, truth), cls  # these scores separate the labels: F1-max is 1
        tp = int(np.sum(decided & truth))
        assert 2 * tp / (decided.sum() + truth.sum()) == result[cls]["f1max_image"] == 1.0
        for r, peak in zip(mine, peaks[cls], strict=True):
            assert float(r["image_score"]) == float(np.float32(peak))  # read back exactly


def test_misses_are_the_anomalous_images_below_the_threshold():
    rows = [
        {"id": f"c/{i}", "class": "c", "label": label, "image_score": repr(score)}
        for i, (label, score) in enumerate([("0", 0.1), ("0", 0.6), ("1", 0.3), ("1", 0.5), ("1", 0.7), ("1", 0.2)])
    ]
    shown = galleries(rows, 8, {"c": 0.5})["c"]
    assert [r["id"] for r in shown[MISSES]] == ["c/5", "c/2"]  # 0.2 and 0.3; 0.5 >= 0.5 was detected
    assert galleries(rows, 1, {"c": 0.5})["c"][MISSES] == [rows[5]]
    assert galleries(rows, 8, {"c": 0.1})["c"][MISSES] == []  # every anomalous image detected: no misses


def test_a_test_run_that_fails_before_writing_leaves_no_folder(tmp_path, monkeypatch):
    import test as test_script
    from utils.errors import UserError

    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "no_images"
    empty.mkdir()
    args = ["--data_set", "mvtec", "--data_path", str(empty), "--device", "cpu"]
    with pytest.raises(UserError, match="no classes found"):
        test_script.main(args)  # default output folder results/vlmdiff_mvtec: claimed, then the run fails
    assert not (tmp_path / "results").exists()
    (tmp_path / "results").mkdir()  # a folder that was there before stays
    with pytest.raises(UserError, match="no classes found"):
        test_script.main([*args, "--output_dir", "results/a/b"])
    assert list((tmp_path / "results").iterdir()) == []


def test_run_folder_names_every_file_as_before(tmp_path):
    run = RunFolder(tmp_path)
    named = {
        run.manifest: "manifest.json",
        run.metrics_json: "metrics.json",
        run.metrics_csv: "metrics.csv",
        run.metrics_md: "metrics.md",
        run.curves: "curves.json",
        run.thresholds: "thresholds.json",
        run.scores: "scores.csv",
        run.report: "report.html",
        run.maps: "maps",
        run.panels: "panels",
        run.visuals: "visuals",
        run.masks: "masks",
        run.report_assets: "report",
        run.log_images("exp"): "log_image_exp",
        run.visual("a b", "x/y.jpg"): "visuals/a_b/x__y.jpg.png",
        run.mask("a", "x/y.png"): "masks/a/x__y.png",
        run.gallery_picture("a", "x/y.png"): "report/gallery/a/x__y.jpg",
        run.curves_figure("mean"): "report/curves/mean.png",
    }
    for path, name in named.items():
        assert run.relative(path) == name and run.resolve(name) == path
    assert RunFolder(str(tmp_path)) == run == RunFolder(run) and str(run) == str(tmp_path) == os.fspath(run)


def test_no_module_joins_a_run_file_onto_a_folder_by_itself():
    root = Path(__file__).resolve().parents[3]
    names = "manifest.json|metrics.json|metrics.csv|metrics.md|curves.json|thresholds.json|scores.csv|report.html"
    join = re.compile(rf"""/ f?["']({names}|maps|panels|visuals|masks|report|log_image_)["'{{/]""")
    modules = [p for p in (root / "vlmdiff" / "evaluation").glob("*.py") if p.name != "run_folder.py"]
    for path in [
        *modules,
        root / "test.py",
        root / "bench" / "bench_eval.py",
        root / "bench" / "bench_report.py",
        root / "bench" / "synthetic_maps.py",
    ]:
        assert not join.findall(path.read_text()), path
