"""The report of a test run: scores.csv, curves, strips, galleries, thresholds, report.html; the paper's row."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_script
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff.evaluation import galleries, plots, report, run_results
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.metrics import METRICS
from vlmdiff.evaluation.thresholds import load_thresholds
from vlmdiff.scoring import image_score

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "2",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--batch_size",
    "5",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A labelled tiny run (two classes, 2 normal + 3 anomalous test images each) with visuals, both protocols."""
    tmp, data, ckpt = demo_data_and_model(tmp_path_factory.mktemp("report"), n_train=1, n_test_good=2, n_test_defect=3)
    out = tmp / "run"
    test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--resume_path",
            str(ckpt),
            "--output_dir",
            str(out),
            *FAST,
            "--save_visuals",
            "--metrics_protocol",
            "both",
            "--gallery_size",
            "2",
        ]
    )
    return tmp, data, ckpt, out


def _scores(run: Path) -> list[dict[str, str]]:
    with open(run / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


class _Page(HTMLParser):
    """Image sources, link targets, and the figure captions under each h3/h4 heading of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs, self.hrefs, self.captions = [], [], {}
        self._heading, self._where, self._in = None, ("", ""), None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(unquote(a["src"]))
        elif tag == "a":
            self.hrefs.append(unquote(a["href"]))
        elif tag in ("h3", "h4", "figcaption"):
            self._in, self._text = tag, ""

    def handle_data(self, data):
        if self._in:
            self._text += data

    def handle_endtag(self, tag):
        if tag != self._in:
            return
        if tag == "h3":
            self._where = (self._text, "")
        elif tag == "h4":
            self._where = (self._where[0], self._text)
        else:
            self.captions.setdefault(self._where, []).append(self._text)
        self._in = None


def _page(path: Path) -> _Page:
    p = _Page()
    p.feed(path.read_text())
    p.close()
    return p


def test_every_file_exists_and_every_reference_resolves(tiny_run):
    *_, run = tiny_run
    for name in (
        "scores.csv",
        "curves.json",
        "thresholds.json",
        "metrics.json",
        "metrics.csv",
        "metrics.md",
        "report.html",
        "report/curves/mean.png",
        "report/curves/brick.png",
        "report/curves/coffee.png",
    ):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    page = _page(run / "report.html")
    assert len(page.srcs) >= 3 + 2 * 2 * 2  # three curve figures, false alarms and detections of two classes
    for ref in page.srcs + page.hrefs:
        assert not ref.startswith(("/", "file:", "http")), ref
        assert (run / ref).is_file(), ref
    assert any(s.startswith("visuals/") for s in page.srcs)
    text = (run / "report.html").read_text()
    assert "model config" in text and str(run.parent / "vlmdiff.ckpt") in text  # provenance
    assert "ours (legacy protocol)" in text and "ours (official protocol)" in text  # --metrics_protocol both


def test_strips_are_legible_with_one_colour_scale_per_class(tiny_run):
    *_, run = tiny_run
    strips = sorted((run / "visuals").rglob("*.png"))
    assert len(strips) == 10
    w, h = Image.open(strips[0]).size
    assert h > 256 and w > 6 * 256  # six 256-px panels plus titles and the colour bar
    curves = json.loads((run / "curves.json").read_text())["classes"]
    for cls, arrays in MapStore(run / "maps").iter_classes():
        lo, hi = curves[cls]["display_range"]
        assert lo < hi and lo <= float(np.median(arrays["maps"])) <= hi


def test_scores_csv_matches_the_stored_maps(tiny_run):
    *_, run = tiny_run
    rows = {r["id"]: r for r in _scores(run)}
    assert len(rows) == 10
    for cls, arrays in MapStore(run / "maps").iter_classes():
        scores = image_score(torch.from_numpy(arrays["maps"].astype(np.float32)), "paper").numpy()
        for image_id, mask, s in zip(arrays["ids"], arrays["masks"], scores, strict=True):
            r = rows[str(image_id)]
            assert r["class"] == cls and r["label"] == str(int((mask > 0).any()))
            assert float(r["image_score"]) == pytest.approx(float(s), abs=1e-6)
            assert Path(r["image_path"]).is_file() and (run / r["visual_path"]).is_file()
            assert r["decision"] == "" and r["mask_path"] == ""


def test_curve_data_agree_with_the_metrics(tiny_run):
    *_, run = tiny_run
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]["official"]["per_class"]
    curves = json.loads((run / "curves.json").read_text())["classes"]
    rows = _scores(run)
    for cls, c in curves.items():
        m = metrics[cls]
        pro = c["pixel"]["pro"]
        assert plots.area_to_limit(pro["fpr"], pro["pro"], 0.3) == pytest.approx(m["aupro"], abs=1e-3)
        roc = c["pixel"]["roc"]
        assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(m["auroc_pixel"], abs=1e-3)
        img = c["image"]["roc"]
        assert np.trapezoid(img["tpr"], img["fpr"]) == pytest.approx(m["auroc_image"], abs=1e-6)
        # the recorded image threshold gives the F1-max of the metrics on the images of scores.csv
        t = json.loads((run / "thresholds.json").read_text())["image"]["per_class"][cls]
        mine = [r for r in rows if r["class"] == cls]
        pred = np.array([float(r["image_score"]) >= t for r in mine])
        truth = np.array([r["label"] == "1" for r in mine])
        tp = int(np.sum(pred & truth))
        assert 2 * tp / (pred.sum() + truth.sum()) == pytest.approx(m["f1max_image"], abs=1e-9)


def test_thinned_curve_keeps_its_area():
    rng = np.random.default_rng(0)
    x = np.concatenate(([0.0], np.sort(rng.random(200_000)), [1.0]))
    y = np.sqrt(x)
    i = plots.thin(x, y)
    assert len(i) < 5000
    assert np.trapezoid(y[i], x[i]) == pytest.approx(np.trapezoid(y, x), abs=plots.RESOLUTION / 4)


def test_galleries_hold_the_right_images(tiny_run):
    *_, run = tiny_run
    rows = _scores(run)
    page = _page(run / "report.html")
    thresholds = json.loads((run / "thresholds.json").read_text())["image"]["per_class"]
    for cls in ("brick", "coffee"):
        mine = sorted((r for r in rows if r["class"] == cls), key=lambda r: float(r["image_score"]))
        normal = [r["id"] for r in mine if r["label"] == "0"]
        anomalous = [r["id"] for r in mine if r["label"] == "1"]
        missed = [r["id"] for r in mine if r["label"] == "1" and float(r["image_score"]) < thresholds[cls]]
        expected = {
            "false alarms (highest-scoring normal images)": normal[::-1][:2],
            galleries.MISSES: missed[:2],
            "best detections (highest-scoring anomalous images)": anomalous[::-1][:2],
        }
        for kind, ids in expected.items():
            shown = [c.split(":")[0] for c in page.captions.get((cls, kind), [])]
            assert shown == ids, (cls, kind)


def test_report_of_a_run_without_visuals_draws_them_from_the_maps(tiny_run, tmp_path, capsys):
    *_, run = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("visuals", "panels", "report", "report.html"))
    report.main([str(copy), "--gallery_size", "1"])
    page = _page(copy / "report.html")
    gallery = [s for s in page.srcs if s.startswith("report/gallery/")]
    assert len(gallery) >= 2 * 2  # at least a false alarm and a detection per class
    for s in gallery:
        assert Image.open(copy / s).size[0] > 4 * 256
    out = capsys.readouterr().out
    assert "ours (legacy protocol)" in out and "ours (official protocol)" not in out  # the paper's protocol
    report.main([str(copy), "--no_html", "--protocol", "both"])
    out = capsys.readouterr().out
    assert "ours (legacy protocol)" in out and "ours (official protocol)" in out


def test_threshold_from_labels_unlabelled_images(tiny_run, tmp_path):
    tmp, data, ckpt, run = tiny_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((data / "brick" / "test").rglob("*.png"))[:4]:
        (folder / f"{p.parent.name} #{p.name}").write_bytes(p.read_bytes())  # '#' and ' ' must survive the links
    out = tmp_path / "unlabelled"
    test_script.main(
        [
            "--data_set",
            "folder",
            "--data_path",
            str(folder),
            "--resume_path",
            str(ckpt),
            "--output_dir",
            str(out),
            *FAST,
            "--save_visuals",
            "--threshold_from",
            str(run),
        ]
    )
    recorded = json.loads((run / "thresholds.json").read_text())
    t_img, t_pix = recorded["image"]["overall"], recorded["pixel"]["overall"]  # class "folder" is not in the run
    rows = {r["id"]: r for r in _scores(out)}
    assert len(rows) == 4 and all(r["label"] == "" for r in rows.values())
    for _cls, arrays in MapStore(out / "maps").iter_classes():
        for image_id, amap in zip(arrays["ids"], arrays["maps"], strict=True):
            r = rows[str(image_id)]
            assert r["decision"] == ("anomalous" if float(r["image_score"]) >= t_img else "normal")
            assert float(r["threshold"]) == pytest.approx(t_img)
            mask = np.asarray(Image.open(out / r["mask_path"]))
            assert np.array_equal(mask > 0, amap >= t_pix)
            assert (out / r["visual_path"]).is_file()
    page = _page(out / "report.html")
    assert all((out / s).is_file() for s in page.srcs + page.hrefs) and any("#" in s for s in page.srcs)


def test_threshold_from_refuses_what_does_not_fit(tiny_run, tmp_path):
    tmp, data, ckpt, run = tiny_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert load_thresholds(run, "paper", manifest)["image"]["overall"] is not None
    with pytest.raises(UserError, match="image_pooling"):
        load_thresholds(run, "ader", manifest)
    with pytest.raises(UserError, match="reconstruction"):
        load_thresholds(run, "paper", {**manifest, "reconstruction": {**manifest["reconstruction"], "ddim_steps": 9}})
    with pytest.raises(UserError, match="thresholds.json"):
        load_thresholds(tmp_path, "paper", manifest)
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(next((data / "brick" / "test").rglob("*.png")).read_bytes())
    out = tmp_path / "other_settings"
    with pytest.raises(UserError, match="reconstruction"):  # refused before any image is scored
        test_script.main(
            [
                "--data_set",
                "folder",
                "--data_path",
                str(folder),
                "--resume_path",
                str(ckpt),
                "--output_dir",
                str(out),
                *FAST,
                "--ddim_steps",
                "3",
                "--threshold_from",
                str(run),
            ]
        )
    assert not (out / "maps").exists()
    with pytest.raises(UserError, match="--threshold_from"):
        test_script.main(
            [
                "--data_set",
                "mvtec",
                "--data_path",
                str(data),
                "--resume_path",
                str(ckpt),
                "--output_dir",
                str(run),
                *FAST,
                "--threshold_from",
                str(run),
            ]
        )


# --------------------------------------------------------------------------- tables across runs
def _fake_run(folder: Path, value: float, protocols=("official",)) -> Path:
    folder.mkdir()
    mean = {k: value for k in METRICS}
    metrics = {p: {"per_class": {"coco": mean}, "mean": mean} for p in protocols}
    (folder / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    return folder


def test_average_of_four_parts(tmp_path, capsys):
    runs = [str(_fake_run(tmp_path / f"p{i}", v)) for i, v in enumerate((0.5, 0.6, 0.7, 0.8))]
    out = report.main([*runs, "--dataset", "coco", "--average", "--no_html", "--output", str(tmp_path / "mean.json")])
    assert out["mean"]["auroc_image"] == pytest.approx(0.65)
    text = capsys.readouterr().out
    assert "paper (coco, legacy protocol)" in text and "65.0" in text and "59.1" in text
    assert "ours (official protocol)" in text  # these runs have no legacy row: the row says which it is
    saved = json.loads((tmp_path / "mean.json").read_text())
    assert saved["mean"]["aupro"] == pytest.approx(0.65) and saved["protocol"] == "official"


def test_side_by_side_table_and_page(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", 0.5, ("official", "legacy"))
    b = _fake_run(tmp_path / "b", 0.75, ("official", "legacy"))
    report.main([str(a), str(b), "--no_html", "--protocol", "both", "--compare", str(tmp_path / "ab.html")])
    text = capsys.readouterr().out
    assert f"| {a} | legacy | 50.0" in text and f"| {b} | official | 75.0" in text
    assert "75.0" in (tmp_path / "ab.html").read_text()


def test_missing_protocol_is_clear(tmp_path):
    run = _fake_run(tmp_path / "r", 0.5)
    with pytest.raises(UserError, match="legacy"):
        report.main([str(run), "--protocol", "legacy", "--no_html"])
    with pytest.raises(UserError, match="not a test run"):
        report.main([str(tmp_path / "nothing")])


# --------------------------------------------------------------------------- a real browser
def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _unavailable(message: str) -> None:
    """Under CI=true a missing browser is a failure (.ci/run installs it); elsewhere the test is skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; .ci/run installs what this test needs before the tests")
    pytest.skip(message)


def test_report_loads_in_headless_chromium(request, tmp_path):
    found = _chromium()
    if found is None:
        _unavailable("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        _unavailable("selenium is not installed (pip install -r requirements.txt)")
    browser, driver_path = found
    *_, run = request.getfixturevalue("tiny_run")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(60)
        driver.get((run / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"
        )
        assert len(images) >= 3 + 2 * 2 * 2  # curves, false alarms and detections of two classes
        broken = [src for src, complete, width in images if not complete or width == 0]
        assert not broken, f"images that did not load: {broken}"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 0
    finally:
        driver.quit()


def test_nan_metric_values_read_back(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    mean = {k: None for k in METRICS}
    (run / "metrics.json").write_text(json.dumps({"metrics": {"official": {"per_class": {}, "mean": mean}}}))
    assert all(math.isnan(v) for v in run_results.read_mean(run, "official").values())


def test_handing_over_curves_changes_no_metric_value():
    from vlmdiff.evaluation.metrics import evaluate_stream

    rng = np.random.default_rng(3)
    maps = rng.random((6, 64, 64)).astype(np.float32)
    masks = np.zeros((6, 64, 64), np.uint8)
    masks[3:, 8:14, 8:14] = 255
    maps[3:, 8:14, 8:14] += 0.3
    seen = {}
    plain = evaluate_stream([("a", maps, masks)], protocol="both")
    with_curves = evaluate_stream(
        [("a", maps, masks)], protocol="both", on_curves=lambda name, c: seen.setdefault(name, plots.class_curves(c))
    )
    assert plain == with_curves and set(seen) == {"a"}
    pro = seen["a"]["pixel"]["pro"]
    assert plots.area_to_limit(pro["fpr"], pro["pro"]) == pytest.approx(plain["official"]["mean"]["aupro"], abs=1e-3)
