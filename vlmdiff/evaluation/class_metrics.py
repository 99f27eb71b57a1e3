"""The seven metrics of one class, streamed from its maps chunk by chunk in memory that does not grow with it.

A class is read through a :class:`class_scan.ClassSource`, which can hand out its ``(maps, masks)`` chunks more
than once; of a class larger than :data:`class_scan.CLASS_BUDGET` nothing is held but per-image numbers (scores, labels)
and one bounded table.

1. The *scan* (:mod:`class_scan`) reads every chunk once: finite maps, image scores and labels, the number of positive
   (ground-truth) and negative pixels, the ground-truth regions (8-connected, per image) and the area of
   each, the lowest and highest score, and a histogram of the positive scores over the top 16 bits of an
   order-preserving integer key (once they outgrow ``budget``, :data:`POSITIVE_BUDGET`; until then the
   positive scores and their region areas are kept). While the class's scores take at most
   :data:`class_scan.CLASS_BUDGET` bytes (~1,000 maps of 256x256) they are all kept, negatives too, and the
   steps below work on them: such a class is read once.
2. The positive scores are sorted into a table of distinct values (count, sum of ``1 / area``). When
   they did not fit, the score axis is cut into stretches of at most ``budget`` positives from the
   histogram (refined 16 bits at a time where one bucket holds more; a single value with more is
   summed, not stored), and the stretches are taken from the top, one more pass each.
3. A pass sorts each chunk's negative scores (of a stretch: those between its bounds) and counts them
   into the table's gaps and ties
   (:func:`curves.bin_negatives`); the table then goes to a :class:`curves.CurveAccumulator`
   and is dropped. The legacy AU-PRO's 200 thresholds are counted in the same pass.

Every count is exact, so the results equal those of sorting the whole class at once (AU-PRO and AP up
to float summation order, ~1e-12). Peak memory is one chunk's work plus one table of at most ``budget``
distinct scores (36 bytes each) while the next is gathered, whatever the class size: bench/bench_eval.py
measures a class of 20,000 float32 maps of 256x256 at about 1.2 GiB peak RSS, 0.63 GiB of it the imported
libraries, where holding the class took about 14.6 GiB; the price is more reads of the class (four there)
and about 1.4 times the time of the in-memory code. A class within :data:`class_scan.CLASS_BUDGET` is read
once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.memory import release_free_memory
from vlmdiff.evaluation.class_scan import (
    DIGIT,
    ClassSource,
    Scan,
    key_type,
    key_values,
    order_keys,
    pieces,
    scan,
)
from vlmdiff.evaluation.curves import CurveAccumulator, bin_negatives, descending_table, table_from_sorted

logger = logging.getLogger(__name__)

POSITIVE_BUDGET = 1 << 23  # positive pixels held at once, ~24 bytes each while their table is built
LEGACY_NUM_THRESHOLDS = 200


# --------------------------------------------------------------------------- stretches of the score axis
@dataclass
class _Stretch:
    lo: int  # keys [lo, hi)
    hi: int
    n_pos: int
    single: bool = False  # one key: its positives are summed, not held
    refine: bool = False  # too many positives for one table: cut it finer


def _group(buckets: list[tuple[int, int, int]], budget: int) -> list[_Stretch]:
    """Contiguous buckets ``(lo, hi, n)`` joined into stretches of at most ``budget`` positives."""
    out: list[_Stretch] = []
    for lo, hi, n in buckets:
        if n > budget:
            out.append(_Stretch(lo, hi, n, single=hi - lo == 1, refine=hi - lo > 1))
        elif out and not (out[-1].single or out[-1].refine) and out[-1].n_pos + n <= budget:
            out[-1].hi, out[-1].n_pos = hi, out[-1].n_pos + n
        else:
            out.append(_Stretch(lo, hi, n))
    return out


def _sub_buckets(st: _Stretch, hist: np.ndarray) -> list[tuple[int, int, int]]:
    width = max((st.hi - st.lo) >> DIGIT, 1)
    return [
        (st.lo + i * width, min(st.lo + (i + 1) * width, st.hi), int(c))
        for i, c in enumerate(hist)
        if st.lo + i * width < st.hi
    ]


def _inside(keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``lo <= keys < hi`` for keys of any width (``hi`` may be one past the largest key)."""
    return (keys >= lo) & (keys <= hi - 1)


def plan(s: Scan, source: ClassSource, name: str, mask_threshold: float, budget: int) -> list[_Stretch]:
    """Stretches covering the whole key axis, ascending, each with at most ``budget`` positives or one value."""
    width = 1 << (s.bits - DIGIT)
    stretches = _group([(i * width, (i + 1) * width, int(c)) for i, c in enumerate(s.hist)], budget)
    while any(st.refine for st in stretches):  # one more read per 16 bits, only where a bucket is too full
        todo = [st for st in stretches if st.refine]
        hists = [np.zeros(1 << DIGIT, np.int64) for _ in todo]
        for _, pos, _ in pieces(s, source, name, mask_threshold, "positives"):
            keys = order_keys(pos)
            for st, h in zip(todo, hists, strict=True):
                shift = (st.hi - st.lo).bit_length() - 1 - DIGIT  # widths are powers of two >= 2
                offset = keys[_inside(keys, st.lo, st.hi)] - st.lo
                h += np.bincount((offset >> max(shift, 0)).astype(np.intp), minlength=1 << DIGIT)
        refined = {id(st): h for st, h in zip(todo, hists, strict=True)}
        new: list[_Stretch] = []
        for st in stretches:
            new.extend(_group(_sub_buckets(st, refined[id(st)]), budget) if st.refine else [st])
        stretches = _group([(st.lo, st.hi, st.n_pos) for st in new], budget)
    return stretches


# --------------------------------------------------------------------------- the passes
@dataclass
class _Table:
    """Distinct positive scores of one stretch (ascending), their counts and ``1 / area`` sums; negatives binned."""

    lo: int
    hi: int
    values: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    binned: np.ndarray  # (2 m + 2,) see vlmdiff.evaluation.curves.bin_negatives

    def bin(self, chunk_neg: np.ndarray, full_axis: bool) -> None:
        """Count the negatives of one chunk that lie in the table's stretch (all of them for the whole axis)."""
        if full_axis:
            bin_negatives(self.values, chunk_neg, self.binned)
            return
        lo, hi = _value_bounds(self.lo, self.hi, chunk_neg.dtype)  # compared as scores: no key per negative
        inside = np.ones(len(chunk_neg), bool) if lo is None else chunk_neg >= lo
        if hi is not None:
            inside &= chunk_neg < hi
        bin_negatives(self.values, chunk_neg[inside], self.binned)


def _value_bounds(lo: int, hi: int, dtype: np.dtype) -> tuple[Any, Any]:
    """Keys ``[lo, hi)`` as scores: finite scores ``x`` have keys in it iff ``a <= x < b`` (None: no bound)."""
    inf = np.array([np.inf], dtype)
    lowest, highest = int(order_keys(-inf)[0]), int(order_keys(inf)[0])
    a = None if lo <= lowest else key_values(np.array([lo]), dtype)[0]
    b = None if hi > highest else key_values(np.array([hi]), dtype)[0]
    return a, b


def _table(
    values: np.ndarray,
    areas: np.ndarray,
    lo: int,
    hi: int,
    singles: dict[int, list] | None = None,
    dtype: np.dtype | None = None,
) -> _Table:
    """The table of held positives (and of the summed single values), ``values`` in any order."""
    order = np.argsort(values)
    v, c, w = table_from_sorted(values[order], 1.0 / areas[order].astype(np.float64))
    del order
    if singles:
        keys = np.array(sorted(singles), dtype=key_type(dtype)[0])
        v = np.concatenate((v, key_values(keys, dtype)))
        c = np.concatenate((c, [singles[int(k)][0] for k in keys]))
        w = np.concatenate((w, [singles[int(k)][1] for k in keys]))
        order = np.argsort(v)
        v, c, w = v[order], c[order], w[order]
    return _Table(lo, hi, v, c, w, np.zeros(2 * len(v) + 2, np.int64))


class _Collector:
    """Gathers the positives of one group of stretches (keys ``[lo, hi)``) during a pass."""

    def __init__(self, group: list[_Stretch], dtype: np.dtype) -> None:
        self.lo, self.hi, self.dtype = group[0].lo, group[-1].hi, dtype
        self.singles = {st.lo: [0, 0.0] for st in group if st.single}
        self.values: list[np.ndarray] = []
        self.areas: list[np.ndarray] = []

    def add(self, pos: np.ndarray, areas: np.ndarray, keys: np.ndarray) -> None:
        inside = _inside(keys, self.lo, self.hi)
        pos, areas, keys = pos[inside], areas[inside], keys[inside]
        if self.singles:
            single = np.isin(keys, np.array(list(self.singles), dtype=keys.dtype))
            for k in np.unique(keys[single]).tolist():
                at = keys == k
                self.singles[int(k)][0] += int(np.count_nonzero(at))
                self.singles[int(k)][1] += float(np.sum(1.0 / areas[at].astype(np.float64)))
            pos, areas = pos[~single], areas[~single]
        self.values.append(pos)
        self.areas.append(areas)

    def table(self) -> _Table:
        values = np.concatenate(self.values) if self.values else np.zeros(0, self.dtype)
        areas = np.concatenate(self.areas) if self.areas else np.zeros(0, np.int32)
        self.values, self.areas = [], []
        return _table(values, areas, self.lo, self.hi, self.singles, self.dtype)


class _Legacy:
    """Counts for the legacy AU-PRO: negatives and region-weighted positives above each of its thresholds."""

    def __init__(self, lo: float, hi: float, num_thresholds: int) -> None:
        self.thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds)  # as upstream: np.arange(min, max, step)
        n = len(self.thresholds) + 1
        self.neg, self.pos = np.zeros(n, np.int64), np.zeros(n)

    def add(self, neg: np.ndarray, pos: np.ndarray, areas: np.ndarray) -> None:
        # searchsorted: how many thresholds lie strictly below a score, i.e. which thresholds it is above
        self.neg += np.bincount(np.searchsorted(self.thresholds, neg), minlength=len(self.neg))
        self.pos += np.bincount(
            np.searchsorted(self.thresholds, pos), weights=1.0 / areas.astype(np.float64), minlength=len(self.pos)
        )

    def aupro(self, n_neg: int, n_regions: int, fpr_limit: float) -> float:
        """Upstream's AU-PRO from the counts: rows with FPR below the limit, FPR divided by its largest kept value."""
        fprs = np.cumsum(self.neg[::-1])[::-1][1:] / n_neg  # negatives above threshold k
        pros = np.cumsum(self.pos[::-1])[::-1][1:] / n_regions
        keep = fprs < fpr_limit
        if keep.sum() < 2 or fprs[keep].max() == 0:
            logger.warning("legacy AU-PRO undefined: fewer than two thresholds with 0 < FPR < %g", fpr_limit)
            return math.nan
        x, y = fprs[keep] / fprs[keep].max(), pros[keep]  # FPR falls as the threshold rises
        return float(-np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))  # sklearn.metrics.auc of a decreasing x


def pixel_passes(
    s: Scan,
    source: ClassSource,
    name: str,
    mask_threshold: float,
    *,
    budget: int,
    legacy: bool,
    fpr_limit: float,
    resolution: float | None,
    official: bool = True,
) -> tuple[dict[str, Any] | None, float | None]:
    """The official pixel metrics (AU-ROC, AP, F1-max, AU-PRO; curves with a ``resolution``; None unless
    ``official``) and the legacy AU-PRO (None unless ``legacy``), from the passes of steps 2-3 of the
    module docstring."""
    legacy_aupro = math.nan if legacy else None
    legacy_counts = None
    if legacy and s.n_pos and s.n_neg:
        if s.hi > s.lo:
            legacy_counts = _Legacy(s.lo, s.hi, LEGACY_NUM_THRESHOLDS)
        else:
            logger.warning("legacy AU-PRO undefined: every score of the class is %s", s.hi)
    if not official:
        if legacy_counts is not None:
            for neg, pos, areas in pieces(s, source, name, mask_threshold):
                legacy_counts.add(neg, pos, areas)
            legacy_aupro = legacy_counts.aupro(s.n_neg, s.n_regions, fpr_limit)
        s.whole = None
        return None, legacy_aupro
    if s.n_pos == 0:
        s.whole = None
        return {"auroc": math.nan, "ap": math.nan, "f1max": math.nan, "aupro": math.nan}, legacy_aupro
    acc = CurveAccumulator(s.n_pos, s.n_neg, s.n_regions, fpr_limit, resolution)
    full_axis = (0, 1 << s.bits)
    if s.held is not None:  # the scan kept every positive: one table, one more pass
        table: _Table | None = _table(
            np.concatenate([p for p, _ in s.held]), np.concatenate([a for _, a in s.held]), *full_axis
        )
        s.held, groups = None, []
    else:  # stretch by stretch from the top; pass k bins the negatives of table k - 1 and collects group k
        table, groups = None, _groups(plan(s, source, name, mask_threshold, budget)[::-1], budget)
        logger.info("class %s: %d positive pixels, taken in %d stretches", name, s.n_pos, len(groups))
    while table is not None or groups:
        collector = _Collector(groups.pop(0), s.dtype) if groups else None
        need = "negatives" if collector is None and legacy_counts is None else "all"
        for neg, pos, areas in pieces(s, source, name, mask_threshold, need):
            if table is not None:
                table.bin(neg, (table.lo, table.hi) == full_axis)
            if need == "negatives":
                continue
            if collector is not None:
                collector.add(pos, areas, order_keys(pos))
            if legacy_counts is not None:
                legacy_counts.add(neg, pos, areas)
        if legacy_counts is not None:  # counted in the first pass
            legacy_aupro, legacy_counts = legacy_counts.aupro(s.n_neg, s.n_regions, fpr_limit), None
        if table is not None:
            for piece in descending_table(table.values, table.counts, table.sums, table.binned):
                acc.add(**piece)
                release_free_memory()
        table = None  # freed before the next table is built
        table = collector.table() if collector is not None else None
        release_free_memory()
    s.whole = None
    return acc.finish(), legacy_aupro


def _groups(stretches: list[_Stretch], budget: int) -> list[list[_Stretch]]:
    """Consecutive stretches whose held positives together fit in ``budget`` (single values hold nothing)."""
    groups: list[list[_Stretch]] = []
    held = budget + 1
    for st in stretches:
        n = 0 if st.single else st.n_pos
        if held + n > budget:
            groups.append([])
            held = 0
        groups[-1].append(st)
        held += n
    return [g[::-1] for g in groups]  # each group ascending, as its table


# --------------------------------------------------------------------------- a class
def evaluate_source(
    name: str,
    source: ClassSource,
    *,
    legacy: bool,
    pooling: str,
    mask_threshold: float,
    fpr_limit: float,
    budget: int = POSITIVE_BUDGET,
    resolution: float | None = None,
    on_chunk: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, Any]:
    """Image and pixel metrics of one class: ``{"image": ranking metrics, "pixel": pixel metrics,
    "legacy_aupro": float | None, "image_scores", "labels", "map_max", "ids" (None unless the chunks have
    ids)}``, the per-image arrays in the order of the chunks. ``on_chunk`` sees every chunk of the scan
    (``maps`` in the work dtype, ``masks`` as the bool ground truth, ``ids``)."""
    s = scan(source, name, pooling, mask_threshold, budget, on_chunk)
    scores, labels = np.concatenate(s.scores), np.concatenate(s.labels)
    image = ranking(scores, labels, resolution)
    pixel, legacy_aupro = pixel_passes(
        s, source, name, mask_threshold, budget=budget, legacy=legacy, fpr_limit=fpr_limit, resolution=resolution
    )
    return {
        "image": image,
        "pixel": pixel,
        "legacy_aupro": legacy_aupro,
        "image_scores": scores,
        "labels": labels,
        "map_max": np.concatenate(s.map_max),
        "ids": np.concatenate(s.ids) if s.ids else None,
        "n_pos": s.n_pos,
        "n_pixels": s.n_pos + s.n_neg,
    }


def ranking(scores: np.ndarray, labels: np.ndarray, resolution: float | None = None) -> dict[str, Any]:
    """AU-ROC, AP and F1-max of 1-D ``scores`` (float64) against bool ``labels``, in memory; NaN unless both occur."""
    pos = np.sort(scores[labels])
    values, counts, _ = table_from_sorted(pos)
    acc = CurveAccumulator(len(pos), len(scores) - len(pos), resolution=resolution)
    binned = np.zeros(2 * len(values) + 2, np.int64)
    bin_negatives(values, scores[~labels], binned)
    for piece in descending_table(values, counts, None, binned):
        acc.add(**piece)
    return acc.finish()
