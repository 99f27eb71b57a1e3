"""The seven metrics: fixture values of both protocols, known answers, ties, bad input, CLI."""

from __future__ import annotations

import json
import logging
import math
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from utils.cli import run_main
from utils.errors import UserError
from vlmdiff.evaluation import array_metrics, metrics

LEGACY_KEYS = {
    "max": "auroc_image",
    "pixel": "auroc_pixel",
    "pro": "aupro",
    "appx": "ap_pixel",
    "apsp": "ap_image",
    "f1px": "f1max_pixel",
    "f1sp": "f1max_image",
}
SKLEARN_KEYS = {
    "image_auroc": "auroc_image",
    "image_ap": "ap_image",
    "image_f1max": "f1max_image",
    "pixel_auroc": "auroc_pixel",
    "pixel_ap": "ap_pixel",
    "pixel_f1max": "f1max_pixel",
}


@pytest.fixture(scope="module")
def inputs(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "metrics_inputs.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def reference(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "metrics_results.json").read_text())


@pytest.fixture(scope="module")
def both(inputs: dict[str, np.ndarray]) -> dict:
    return metrics.evaluate(inputs["preds"], inputs["masks"], inputs["clsname"], protocol="both")


def _rows(result: dict) -> dict[str, dict[str, float]]:
    return {**result["per_class"], "mean": result["mean"]}


def test_result_structure(both: dict, inputs: dict[str, np.ndarray]) -> None:
    assert set(both) == {"official", "legacy"}
    for res in both.values():
        assert list(res["per_class"]) == list(dict.fromkeys(inputs["clsname"].tolist()))
        for row in _rows(res).values():
            assert tuple(row) == metrics.METRICS
            assert all(type(v) is float and 0.0 <= v <= 1.0 for v in row.values())


def test_legacy_matches_upstream(both: dict, reference: dict) -> None:
    ours = _rows(both["legacy"])
    assert set(reference["legacy_upstream"]) == set(ours)
    for cls, ref in reference["legacy_upstream"].items():
        for key, metric in LEGACY_KEYS.items():
            assert abs(ours[cls][metric] - ref[key]) <= 1e-9, (cls, metric, ours[cls][metric], ref[key])


def test_official_matches_sklearn_and_mvtec(both: dict, reference: dict) -> None:
    ours = _rows(both["official"])
    for cls, ref in reference["sklearn"].items():
        for key, metric in SKLEARN_KEYS.items():
            assert abs(ours[cls][metric] - ref[key]) <= 1e-9, (cls, metric)
    for cls, ref in reference["official"].items():
        assert abs(ours[cls]["aupro"] - ref["aupro_0.3"]) <= 1e-8, cls  # MVTec code keeps FPRs in float32
    for cls, ref in reference["official_f64_bruteforce"].items():
        assert abs(ours[cls]["aupro"] - ref["aupro_0.3"]) <= 1e-12, cls


def test_official_never_flips_auroc(both: dict, reference: dict) -> None:
    flipped = 0
    for level in ("image", "pixel"):
        for cls, ref in reference["sklearn"].items():
            if cls == "mean" or ref[f"{level}_auroc"] >= 0.5:
                continue
            off, leg = both["official"]["per_class"][cls], both["legacy"]["per_class"][cls]
            assert off[f"auroc_{level}"] < 0.5
            assert leg[f"auroc_{level}"] == pytest.approx(1.0 - off[f"auroc_{level}"], abs=1e-12)
            flipped += 1
    assert flipped, "the fixture should hold an anti-correlated class"


# ---------------------------------------------------------------- AU-PRO known answers


def _column_case(height: int) -> tuple[np.ndarray, np.ndarray]:
    """One image, GT = the full first column; both columns rise 0, 1, ..., height-1 down the rows.

    Every score level holds one GT and one normal pixel (a tie), so PRO = FPR = k / height at
    each threshold: the curve is the diagonal and AU-PRO up to FPR L is (L^2 / 2) / L = L / 2.
    """
    rows = np.arange(height, dtype=np.float32)
    maps = np.stack([rows, rows], axis=1)[None]  # (1, H, 2)
    gt = np.zeros_like(maps, dtype=bool)
    gt[0, :, 0] = True
    return maps, gt


@pytest.mark.parametrize("height", [6, 7, 30])
def test_aupro_known_answer_diagonal(height: int) -> None:
    maps, gt = _column_case(height)
    assert array_metrics.aupro(maps, gt, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=1e-12)
    assert array_metrics.aupro(maps.astype(np.float64), gt, fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    assert array_metrics.aupro(maps, gt, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_all_scores_tied() -> None:
    # one threshold only: the curve jumps from (0, 0) straight to (1, 1); PRO at 0.3 is interpolated
    gt = np.zeros((3, 10, 10), dtype=bool)
    gt[0, 2:5, 2:5] = True
    gt[1, 7:, :] = True
    maps = np.full(gt.shape, 0.25, dtype=np.float32)
    assert array_metrics.aupro(maps, gt) == pytest.approx(0.15, abs=1e-12)


def test_aupro_weights_regions_equally() -> None:
    # a 100-pixel region scored above every normal pixel, a 1-pixel region below all of them:
    # PRO is 1/2 from FPR 0 on, whatever the areas (area weighting would give 100/101)
    maps = np.full((1, 20, 20), 0.5, dtype=np.float32)
    gt = np.zeros(maps.shape, dtype=bool)
    gt[0, :10, :10] = True
    maps[0, :10, :10] = 0.9
    gt[0, 15, 15] = True
    maps[0, 15, 15] = 0.1
    assert array_metrics.aupro(maps, gt) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # a 2x2 and a 3x3 square touching at one corner form one 13-pixel region (two under
    # 4-connectivity). Only the 2x2 square scores above the normal pixels, so PRO jumps to
    # p0 = 4/13 at FPR 0 (not 1/2), then rises linearly to (1, 1): AU-PRO_0.3 = 0.85 p0 + 0.15.
    maps = np.zeros((1, 8, 8), dtype=np.float32)
    gt = np.zeros(maps.shape, dtype=bool)
    gt[0, 1:3, 1:3] = gt[0, 3:6, 3:6] = True
    maps[0, 1:3, 1:3] = 1.0
    assert array_metrics.aupro(maps, gt) == pytest.approx(0.85 * 4 / 13 + 0.15, abs=1e-12)


def _bruteforce_aupro(maps: np.ndarray, gt: np.ndarray, limit: float) -> float:
    """MVTec AD AU-PRO by looping over every distinct threshold (independent of the library)."""
    labelled = [ndimage.label(g, structure=np.ones((3, 3)))[0] for g in gt]
    regions = [(i, lab == r) for i, lab in enumerate(labelled) for r in range(1, lab.max() + 1)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        fprs.append(np.sum(hit & ~gt) / np.sum(~gt))
        pros.append(np.mean([hit[i][r].sum() / r.sum() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    x, y = np.array(fprs), np.array(pros)
    area = 0.0
    if limit not in x:
        k = bisect_right(x, limit)
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        area = 0.5 * (y_lim + y[k - 1]) * (limit - x[k - 1])
    keep = x <= limit
    return float(area + np.sum(0.5 * (y[keep][1:] + y[keep][:-1]) * np.diff(x[keep]))) / limit


def _random_case(seed: int, n: int = 5, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.random((n, size, size)) > 0.93
    gt = ndimage.binary_dilation(gt, structure=np.ones((1, 2, 2)))
    gt[0] = False  # one normal image
    maps = np.round(rng.random(gt.shape) * 12 + 4 * gt) / 4  # coarse values: many ties
    return maps.astype(np.float32), gt


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_bruteforce(seed: int, limit: float) -> None:
    maps, gt = _random_case(seed)
    ref = _bruteforce_aupro(maps.astype(np.float64), gt, limit)
    assert array_metrics.aupro(maps, gt, fpr_limit=limit) == pytest.approx(ref, abs=1e-12)
    # float64 scores that are not float32 values take the argsort path: same answer
    shifted = maps.astype(np.float64) + 1e-9
    assert array_metrics.aupro(shifted, gt, fpr_limit=limit) == pytest.approx(ref, abs=1e-12)
    # negative scores (sign handling of the packed keys)
    assert array_metrics.aupro(maps - 2.0, gt, fpr_limit=limit) == pytest.approx(ref, abs=1e-12)


def test_pixel_and_ranking_metrics_equal_sklearn() -> None:
    maps, gt = _random_case(3)
    y, s = gt.ravel(), maps.ravel().astype(np.float64)
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / (precision + recall)
    ref = {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1max": np.max(f1[np.isfinite(f1)])}
    for scores in (maps, maps.astype(np.float64) + 1e-9):
        ours = array_metrics.pixel_metrics(scores, gt)
        for k, v in ref.items():
            assert ours[k] == pytest.approx(v, abs=1e-12), k
    ranked = array_metrics.ranking_metrics(s, y)
    for k, v in ref.items():
        assert ranked[k] == pytest.approx(v, abs=1e-12), k


# ---------------------------------------------------------------- masks, undefined cases, bad input


def test_mask_encodings_and_threshold(inputs: dict[str, np.ndarray]) -> None:
    m8 = inputs["masks"]
    assert np.array_equal(metrics.binarize_masks(m8), m8 > 0)
    assert np.array_equal(metrics.binarize_masks(m8 / 255.0), m8 > 0)
    assert np.array_equal(metrics.binarize_masks(torch.from_numpy(m8 > 0)), m8 > 0)
    assert np.array_equal(metrics.binarize_masks(m8, 0.5), m8 >= 128)
    assert np.array_equal(metrics.binarize_masks(m8.astype(np.float32) / 255.0, 0.5), m8 >= 128)
    with pytest.raises(UserError, match="uint8"):
        metrics.binarize_masks(m8.astype(np.int64) * 2)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        metrics.binarize_masks(m8.astype(np.float32))
    with pytest.raises(UserError, match="mask_threshold"):
        metrics.binarize_masks(m8, 1.0)


def test_input_types_give_identical_results(inputs: dict[str, np.ndarray], both: dict) -> None:
    maps = torch.from_numpy(inputs["preds"].astype(np.float32))
    masks = torch.from_numpy(inputs["masks"].astype(np.float32) / 255.0)
    res = metrics.evaluate(maps, masks, list(inputs["clsname"]), protocol="official")
    assert res == both["official"]
    # classes interleaved instead of contiguous: same per-class values
    order = np.argsort(np.arange(len(inputs["preds"])) % 5, kind="stable")
    res = metrics.evaluate(inputs["preds"][order], inputs["masks"][order], inputs["clsname"][order])
    for cls, row in both["official"]["per_class"].items():
        assert res["per_class"][cls] == pytest.approx(row, abs=1e-12)


def test_class_without_anomalies_is_nan_with_warning(
    inputs: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    maps, masks = inputs["preds"], inputs["masks"]
    normal = masks.reshape(len(masks), -1).max(axis=1) == 0
    anomalous = ~normal
    assert normal.sum() >= 1 and anomalous.sum() >= 2
    items = [("normal_only", maps[normal], masks[normal]), ("anomalous_only", maps[anomalous], masks[anomalous])]
    with caplog.at_level(logging.WARNING, logger="vlmdiff.evaluation.metrics"):
        res = metrics.evaluate_stream(items)
    assert all(math.isnan(v) for v in res["per_class"]["normal_only"].values())
    only = res["per_class"]["anomalous_only"]
    image_level = ("auroc_image", "ap_image", "f1max_image")
    assert all(math.isnan(only[k]) for k in image_level)  # no normal image: undefined, not a trivial 1.0
    assert all(not math.isnan(v) for k, v in only.items() if k not in image_level)
    assert math.isnan(res["mean"]["auroc_image"])  # no class defines it
    assert res["mean"]["aupro"] == only["aupro"]  # mean over the classes where it is defined
    assert res["mean_over"] == {
        **{k: 0 for k in image_level},
        "auroc_pixel": 1,
        "ap_pixel": 1,
        "f1max_pixel": 1,
        "aupro": 1,
    }
    assert "normal_only" in caplog.text and "undefined" in caplog.text


def test_class_without_normal_pixels() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    res = array_metrics.pixel_metrics(maps, np.ones(maps.shape, dtype=bool))
    assert all(math.isnan(v) for v in res.values()) and set(res) == {"auroc", "ap", "f1max", "aupro"}
    assert math.isnan(array_metrics.legacy_aupro(maps, np.ones(maps.shape, dtype=bool)))


def test_bad_input_raises_user_error(inputs: dict[str, np.ndarray]) -> None:
    maps, masks, names = inputs["preds"].astype(np.float32), inputs["masks"], inputs["clsname"]
    bad = maps.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(UserError, match="NaN"):
        metrics.evaluate(bad, masks, names)
    with pytest.raises(UserError, match="shape|class_names"):
        metrics.evaluate(maps[:, :-1], masks, names)
    with pytest.raises(UserError, match="class_names"):
        metrics.evaluate(maps, masks, names[:-1])
    with pytest.raises(UserError, match="no images"):
        metrics.evaluate_stream([("empty", maps[:0], masks[:0])])
    with pytest.raises(UserError, match="twice"):
        metrics.evaluate_stream([("a", maps[:4], masks[:4]), ("a", maps[4:8], masks[4:8])])
    with pytest.raises(UserError, match="protocol"):
        metrics.evaluate(maps, masks, names, protocol="paper")


def test_evaluate_stream_equals_evaluate(inputs: dict[str, np.ndarray], both: dict) -> None:
    names = inputs["clsname"]
    items = ((c, inputs["preds"][names == c], inputs["masks"][names == c]) for c in dict.fromkeys(names.tolist()))
    assert metrics.evaluate_stream(items, protocol="both") == both


# ---------------------------------------------------------------- reporting and CLI


def test_format_table_and_paper_comparison(both: dict) -> None:
    table = metrics.format_table(both["official"], title="fixture")
    lines = table.splitlines()
    assert lines[0] == "### fixture"
    n = len(both["official"]["per_class"])
    assert lines[-2].startswith("| mean | ")
    assert f"{100 * both['official']['mean']['auroc_pixel']:.1f}" in lines[-2]
    assert lines[-1] == "| classes in mean | " + " | ".join([f"{n} of {n}"] * 7) + " |"
    assert len(lines) == 4 + n + 2
    assert "### legacy" in metrics.format_table(both)
    cmp = metrics.compare_to_paper(metrics.PAPER_RESULTS["mvtec"], "mvtec")
    assert "| difference | +0.0 |" in cmp and "89.4" in cmp
    assert metrics.PAPER_RESULTS["realiad"]["aupro"] == pytest.approx(0.877)
    assert "paper (realiad)" in metrics.compare_to_paper(both["official"]["mean"], "real_iad")
    with pytest.raises(UserError, match="known"):
        metrics.compare_to_paper(both["official"]["mean"], "kitti")


def test_cli_writes_json(fixtures_dir: Path, tmp_path: Path, both: dict, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m.json"
    metrics.main([str(fixtures_dir / "metrics_inputs.npz"), "--protocol", "both", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| mean |" in printed and "(legacy)" in printed
    saved = json.loads(out.read_text())
    assert saved["settings"]["protocol"] == "both"
    assert saved["official"] == both["official"] and saved["legacy"] == both["legacy"]


def test_cli_bad_files(tmp_path: Path, inputs: dict[str, np.ndarray]) -> None:
    with pytest.raises(UserError, match="not found"):
        metrics.main([str(tmp_path / "missing.npz")])
    np.savez(tmp_path / "nomasks.npz", maps=inputs["preds"], clsname=inputs["clsname"])
    with pytest.raises(UserError, match="nomasks.npz.*'masks'"):
        metrics.main([str(tmp_path / "nomasks.npz")])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        metrics.main([str(tmp_path / "junk.npz")])
    np.savez(
        tmp_path / "empty_cls.npz", maps=inputs["preds"][:0], masks=inputs["masks"][:0], class_names=np.array([], "<U1")
    )
    with pytest.raises(UserError, match="empty_cls.npz"):
        metrics.main([str(tmp_path / "empty_cls.npz")])


def test_cli_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_main(metrics.main, [str(tmp_path / "missing.npz")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.npz'}: file not found"
