"""The streamed metrics equal the in-memory ones they replaced (tests/reference_metrics.py), whatever the budget.

Random maps and adversarial ones (ties, constant maps, scores in one narrow band, empty and full masks,
float16/32/64, -0.0), each at budgets that take the class in one table or in several stretches of the score
axis, with full histogram buckets refined and single values summed instead of held; classes read from a
MapStore chunk by chunk; curve points. Every test runs twice: with the class kept from its one read
(:data:`class_scan.CLASS_BUDGET`) and read again for each pass (a budget of 0 bytes).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tests import reference_metrics as R
from vlmdiff.evaluation import array_metrics as A
from vlmdiff.evaluation import class_metrics as CM
from vlmdiff.evaluation import class_scan as CS
from vlmdiff.evaluation import curves as C
from vlmdiff.evaluation import metrics as M
from vlmdiff.evaluation import plots
from vlmdiff.evaluation.map_store import MapStore


@pytest.fixture(autouse=True, params=["kept", "read_again"])
def class_budget(request, monkeypatch) -> str:
    if request.param == "read_again":
        monkeypatch.setattr(CS, "CLASS_BUDGET", 0)
    return request.param


class _Counted:
    """A class source that counts how often it is read."""

    def __init__(self, source: CS.ClassSource) -> None:
        self.source, self.reads = source, 0

    def chunks(self):
        self.reads += 1
        yield from self.source.chunks()


@pytest.mark.parametrize("protocol", ["official", "legacy", "both"])
def test_a_class_that_fits_is_read_once(class_budget: str, protocol: str) -> None:
    rng = np.random.default_rng(5)
    maps = rng.random((9, 64, 64)).astype(np.float32)
    masks = np.zeros((9, 64, 64), np.uint8)
    masks[::2, 4:12, 6:9] = 255
    source = _Counted(CS.ArrayClass(maps, masks, batch=4))
    ours = M.evaluate_stream([("c", source)], protocol=protocol)
    ref = R.evaluate_class("c", maps, masks, protocol, "paper", 0.0)
    for p in ref:
        row = ours[p]["per_class"]["c"] if protocol == "both" else ours["per_class"]["c"]
        assert all(_same(v, row[k]) for k, v in ref[p].items())
    assert source.reads == (1 if class_budget == "kept" else 2)
    small = _Counted(CS.ArrayClass(maps, masks, batch=4))  # positives in stretches: still one read when kept
    M.evaluate_stream([("c", small)], protocol=protocol, budget=20)
    assert small.reads == 1 if class_budget == "kept" else small.reads > 2


def _budgets(gt: np.ndarray, few_values: bool) -> list[int]:
    """A third and a half of the positives (several stretches), all of them (the scan holds them) and, with
    few distinct scores, one (every value a single summed stretch: one pass per value)."""
    n = int(gt.sum())
    return [max(1, n // 3), max(1, n // 2), 10**9] + ([1] if few_values else [])


def _same(a: float, b: float, tol: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def _case(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    n, h = int(rng.integers(1, 6)), int(rng.integers(4, 20))
    if kind == "random":
        maps = rng.random((n, h, h)).astype(np.float32)
    elif kind == "ties":
        maps = rng.integers(0, 4, (n, h, h)).astype(np.float32)
    elif kind == "constant":
        maps = np.full((n, h, h), 0.5, np.float32)
    elif kind == "narrow":  # one histogram bucket: refined to the exact values
        maps = (0.5 + rng.random((n, h, h)) * 1e-4).astype(np.float32 if rng.random() < 0.5 else np.float64)
    elif kind == "float16":
        maps = rng.random((n, h, h)).astype(np.float16)
    elif kind == "float64":
        maps = rng.random((n, h, h))
    else:  # signed, with both zeros
        maps = (rng.random((n, h, h)) - 0.5).astype(np.float32)
        maps[0, 0, :2] = (-0.0, 0.0)
    gt = rng.random((n, h, h)) < rng.choice([0.0, 0.05, 0.5, 1.0])
    return maps, gt


KINDS = ("random", "ties", "constant", "narrow", "float16", "float64", "signed")


@pytest.mark.parametrize("kind", KINDS)
def test_pixel_metrics_and_legacy_aupro_equal_the_in_memory_ones(kind: str) -> None:
    rng = np.random.default_rng(KINDS.index(kind))
    for _ in range(8):
        maps, gt = _case(rng, kind)
        ref = R.pixel_metrics(maps, gt)
        for budget in _budgets(gt, kind in ("ties", "constant")):
            ours = A.pixel_metrics(maps, gt, budget=budget)
            for k in ("auroc", "ap", "f1max", "aupro"):
                assert _same(ref[k], ours[k]), (kind, budget, k, ref[k], ours[k])
        assert _same(R.legacy_aupro(maps, gt), A.legacy_aupro(maps, gt))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_budgets_really_cut_the_score_axis(monkeypatch, dtype) -> None:
    """Small budgets take the class in several stretches, refine full buckets and sum single values."""
    rng = np.random.default_rng(0)
    maps = np.concatenate(
        [
            rng.integers(0, 3, (2, 16, 16)),  # three values, each in a full bucket
            0.5 + rng.random((2, 16, 16)) * 1e-4,
        ]
    ).astype(dtype)  # one narrow band: refined
    gt = rng.random((4, 16, 16)) < 0.5
    seen = []
    real_plan = CM.plan
    monkeypatch.setattr(CM, "plan", lambda *a, **k: seen.append(real_plan(*a, **k)) or seen[-1])
    ours = A.pixel_metrics(maps, gt, budget=40)
    (stretches,) = seen
    assert sum(st.single for st in stretches) == 3 and sum(st.n_pos for st in stretches) == gt.sum()
    assert max(st.n_pos for st in stretches if not st.single) <= 40 and len(stretches) > 4
    assert stretches[0].lo == 0 and stretches[-1].hi == 1 << (32 if dtype == np.float32 else 64)
    assert all(a.hi == b.lo for a, b in itertools.pairwise(stretches))  # they cover the key axis once
    ref = R.pixel_metrics(maps, gt)
    assert all(_same(ref[k], ours[k]) for k in ("auroc", "ap", "f1max", "aupro"))


@pytest.mark.parametrize("protocol", ["official", "legacy"])
def test_evaluate_equals_the_in_memory_evaluation(protocol: str) -> None:
    rng = np.random.default_rng(7)
    maps = rng.random((12, 64, 64)).astype(np.float32)
    masks = np.zeros((12, 64, 64), np.uint8)
    masks[6:, 8:16, 8:20] = 255
    maps[6:, 8:16, 8:20] += 0.2
    maps[2] = 0.25  # a constant map among the others
    names = np.array(["a"] * 5 + ["b"] * 7)
    ours = M.evaluate(maps, masks, names, protocol=protocol)
    for cls in ("a", "b"):
        sel = names == cls
        ref = R.evaluate_class(cls, maps[sel], masks[sel], protocol, "paper", 0.0)[protocol]
        for k, v in ref.items():
            assert _same(v, ours["per_class"][cls][k]), (cls, k)


def test_a_class_streamed_from_the_map_store_in_a_small_budget(tmp_path) -> None:
    """Chunks of three images read again for each stretch give the in-memory values."""
    rng = np.random.default_rng(11)
    maps = (rng.random((20, 64, 64)) * 0.5).astype(np.float16)
    masks = np.zeros((20, 64, 64), np.uint8)
    for i in range(0, 20, 2):
        masks[i, rng.integers(0, 20) :][:, :12] = 255
        maps[i][masks[i] > 0] += np.float16(0.3)
    store = MapStore(tmp_path / "maps", dtype="float16")
    for a in range(0, 20, 3):
        ids = [f"c/{i:03d}" for i in range(a, min(a + 3, 20))]
        store.write(
            f"{a:08d}",
            ids,
            ["c"] * len(ids),
            maps[a : a + 3],
            masks[a : a + 3],
            (masks[a : a + 3] > 0).any((1, 2)),
            np.zeros(len(ids)),
        )
    ((cls, source),) = store.class_sources()
    streamed = M.evaluate_stream([(cls, source)], protocol="both", budget=50)
    ref = R.evaluate_class("c", maps, masks, "both", "paper", 0.0)
    for protocol in ("official", "legacy"):
        for k, v in ref[protocol].items():
            assert _same(v, streamed[protocol]["per_class"]["c"][k]), (protocol, k)


def test_undefined_metrics_stay_nan() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    none = A.pixel_metrics(maps, np.zeros(maps.shape, bool))
    full = A.pixel_metrics(maps, np.ones(maps.shape, bool))
    assert all(math.isnan(none[k]) and math.isnan(full[k]) for k in ("auroc", "ap", "f1max", "aupro"))


def test_curve_points_equal_those_of_the_whole_curves() -> None:
    """ROC and PR points kept piece by piece are the points the whole curves gave; PRO heights are sums of
    ``1 / area`` in another order, so a point next to a bin edge may differ: its area is checked instead."""
    rng = np.random.default_rng(5)
    for t in range(12):
        n, h = int(rng.integers(1, 6)), int(rng.integers(8, 48))
        maps = (rng.random((n, h, h)) if t % 3 else rng.integers(0, 40, (n, h, h))).astype(np.float32)
        gt = rng.random((n, h, h)) < rng.choice([0.05, 0.5])
        ref = R.pixel_metrics(maps, gt, keep_curves=True)
        for budget in _budgets(gt, False):
            ours = A.pixel_metrics(maps, gt, keep_curves=True, budget=budget)
            assert ours["f1max_threshold"] == ref["f1max_threshold"]
            a, b = R.curve_record(ref, C.RESOLUTION, True), plots._ranking_curves(ours)
            for curve in ("roc", "pr"):
                for key, values in a[curve].items():
                    np.testing.assert_allclose(b[curve][key], values, rtol=0, atol=1e-12, err_msg=f"{curve}.{key}")
            assert plots.area_to_limit(b["pro"]["fpr"], b["pro"]["pro"]) == pytest.approx(ours["aupro"], abs=3e-4)
            assert abs(len(a["pro"]["fpr"]) - len(b["pro"]["fpr"])) <= 4
    scores, labels = rng.random(500), rng.random(500) < 0.2
    a = R.curve_record(R.ranking_metrics(scores, labels, True), C.RESOLUTION, False)
    b = plots._ranking_curves(A.ranking_metrics(scores, labels, True))
    assert a == b


def test_thinner_keeps_what_thin_keeps() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        x = np.cumsum(rng.random(n) * rng.choice([0.0, 0.01, 0.1], n))
        y = np.cumsum(rng.random(n) * 0.01)
        resolution = float(rng.choice([1e-3, 1e-2, 0.05]))
        thinner = C.Thinner(resolution)
        for part in np.split(np.arange(n), np.sort(rng.choice(np.arange(n + 1), int(rng.integers(0, 4))))):
            thinner.add(x[part], y[part], part)
        assert np.array_equal(np.sort(thinner.finish()[2]), C.thin(x, y, resolution))


def test_order_keys_sort_like_the_floats() -> None:
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        v = np.concatenate(
            [
                (rng.standard_normal(1000) * 10.0 ** rng.integers(-30, 30, 1000)),
                [0.0, -0.0, np.finfo(dtype).max, -np.finfo(dtype).max],
            ]
        ).astype(dtype)
        keys = CS.order_keys(v)
        assert np.array_equal(np.argsort(keys, kind="stable"), np.argsort(v + 0.0, kind="stable"))
        assert CS.order_keys(np.array([-0.0], dtype))[0] == CS.order_keys(np.array([0.0], dtype))[0]
        np.testing.assert_array_equal(CS.key_values(keys, np.dtype(dtype)), v + 0.0)


def test_display_range_from_chunks() -> None:
    """The display range gathered chunk by chunk equals the one of the whole class, and holds a bounded sample."""
    from vlmdiff.evaluation.visuals import DisplaySample, class_range

    rng = np.random.default_rng(2)
    maps = rng.random((50, 32, 32)).astype(np.float32)
    whole = np.percentile(maps[:, ::4, ::4], [0.1, 99.9])
    sample = DisplaySample(len(maps))
    for a in range(0, 50, 7):
        sample.add(maps[a : a + 7])
    assert sample.range() == pytest.approx(tuple(whole), abs=1e-6) == class_range(maps)
    bounded = DisplaySample(len(maps), max_images=8)  # every 7th image: 0, 7, ..., 49
    for a in range(0, 50, 3):
        bounded.add(maps[a : a + 3])
    assert sum(len(p) for p in bounded.parts) == 8 * 8 * 8
    assert bounded.range() == pytest.approx(tuple(np.percentile(maps[::7, ::4, ::4], [0.1, 99.9])), abs=1e-6)


def test_tables_and_negatives_cut_in_slices_give_the_same_results(monkeypatch) -> None:
    """Tables are fed to the accumulator, and negatives counted, :data:`curves.SLICE` values at a time,
    negatives sorted :data:`curves.SORT_SLICE` at a time (both ways of counting them)."""
    rng = np.random.default_rng(4)
    maps = rng.integers(0, 60, (3, 24, 24)).astype(np.float32) / 7
    gt = rng.random((3, 24, 24)) < 0.3
    whole = A.pixel_metrics(maps, gt, keep_curves=True)
    monkeypatch.setattr(C, "SLICE", 5)
    monkeypatch.setattr(C, "SORT_SLICE", 13)
    sliced = A.pixel_metrics(maps, gt, keep_curves=True)
    assert all(_same(whole[k], sliced[k], 1e-12) for k in ("auroc", "ap", "f1max", "aupro"))
    a, b = plots._ranking_curves(whole), plots._ranking_curves(sliced)
    for curve in ("roc", "pr", "pro"):  # the same points; AU-PRO, summed in pieces, is compared above to 1e-12
        assert {k: v for k, v in a[curve].items() if k != "aupro"} == {
            k: v for k, v in b[curve].items() if k != "aupro"
        }, curve


def test_both_ways_of_counting_negatives_agree(monkeypatch) -> None:
    """Table values looked up among sorted negatives, or negatives among the table: the same counts."""
    rng = np.random.default_rng(8)
    for _ in range(50):
        table = np.unique(rng.integers(0, 30, int(rng.integers(0, 12)))).astype(np.float32)
        negatives = rng.integers(-2, 33, int(rng.integers(0, 80))).astype(np.float32)
        expected = np.zeros(2 * len(table) + 2, np.int64)
        for v in negatives:  # by definition
            j = int(np.searchsorted(table, v, side="left"))
            expected[2 * j + int(j < len(table) and table[j] == v)] += 1
        for sort_slice in (1, 4, 1000):  # 1000: few table values, looked up among the negatives
            got = np.zeros_like(expected)
            monkeypatch.setattr(C, "SORT_SLICE", sort_slice)
            C.bin_negatives(table, negatives, got)
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_stretch_of_keys_is_a_stretch_of_scores(dtype) -> None:
    """:func:`class_metrics._value_bounds`: the scores whose keys lie in ``[lo, hi)``, by comparison alone."""
    rng = np.random.default_rng(3)
    bits = 32 if dtype == np.float32 else 64
    values = np.concatenate(
        [(rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).astype(dtype), [-0.0, 0.0, -np.inf, np.inf]]
    ).astype(dtype)
    values = values[np.isfinite(values)]
    keys = CS.order_keys(values)
    edges = [0, 1 << bits, *(int(k) for k in rng.choice(keys, 20)), *(int(k) + 1 for k in rng.choice(keys, 10))]
    edges += [int(CS.order_keys(np.array([v], dtype))[0]) for v in (0.0, -np.inf, np.inf)]
    for lo, hi in itertools.combinations(sorted(set(edges)), 2):
        a, b = CM._value_bounds(lo, hi, np.dtype(dtype))
        by_value = (values >= (-np.inf if a is None else a)) & (values < (np.inf if b is None else b))
        if b is None:
            by_value |= values == np.inf
        assert np.array_equal(by_value, CM._inside(keys, lo, hi)), (lo, hi)
