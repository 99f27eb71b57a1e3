"""Exact ranking metrics and curve points from score tables fed piece by piece, highest scores first.

Every distinct positive score ``v`` is a threshold and a sample is called positive when its score is
``>= v`` (as scikit-learn's ``_binary_clf_curve`` and MVTec AD's ``compute_pro`` do). A *table* lists,
for a stretch of the score axis, the distinct positive scores in descending order with

* ``count``: positives with exactly that score,
* ``weight``: the sum of the positives' PRO weights (``1 / area`` of each pixel's ground-truth
  region; the PRO is their cumulative sum divided by the number of regions),
* ``equal``: negatives with exactly that score,
* ``below``: negatives strictly between that score and the next lower one of the table (for the
  last score: the negatives of the stretch below it),

and ``above``: the stretch's negatives above its highest positive score. :class:`CurveAccumulator`
takes such tables in descending order of the score axis, stretch after stretch, and keeps only
running counts, so a class of any size is measured in memory set by one table. Between two distinct
positive scores only the false positives change, so the ROC and PRO curves are exact with two points
per distinct positive score: just above it and at it; AU-ROC is summed in integers. AP is
scikit-learn's ``sum (R_n - R_{n-1}) P_n``, F1 = 2 TP / (TP + FP + P), and AU-PRO follows MVTec AD:
(0, 0) and (1, 1) end points, trapezoid up to the FPR limit with the PRO interpolated there, divided by it.

With a ``resolution`` the accumulator also keeps the curve points (ROC, PR, PRO) that :func:`thin`
would keep of the whole curves, without holding them: :class:`Thinner` does it piece by piece.
This is written by hand because no library computes exact curves from pieces in bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

RESOLUTION = 1e-3  # default resolution of the kept curve points (path length, in curve units)


def thin(x: np.ndarray, y: np.ndarray, resolution: float = RESOLUTION, keep: Sequence[int] = ()) -> np.ndarray:
    """Indices of the points of the polyline ``(x, y)`` kept at ``resolution``.

    The path length ``sum |dx| + |dy|`` is cut into bins of ``resolution``; the first and the last
    point of every bin are kept (and the ends and ``keep``), so every dropped stretch is shorter than
    ``resolution``. On a monotone curve that moves an area by less than ``resolution**2 / 8`` per bin,
    ``resolution / 4`` in all.
    """
    n = len(x)
    if n <= 2:
        return np.arange(n)
    s = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    b = np.floor(s / resolution).astype(np.int64)
    edge = np.flatnonzero(b[1:] != b[:-1])  # last point of a bin; edge + 1 is the first of the next
    return np.unique(np.concatenate(([0, n - 1], edge, edge + 1, np.asarray(keep, dtype=np.int64))))


class Thinner:
    """:func:`thin` over a polyline that arrives in pieces: the same points, without holding the curve.

    ``add(x, y, *extra)`` appends points (``extra``: arrays carried along, e.g. thresholds);
    ``finish()`` returns the kept points as arrays ``(x, y, *extra)``. The path length is summed in the
    same order as :func:`thin` sums it, so the kept points are the same.
    """

    def __init__(self, resolution: float) -> None:
        self.resolution = resolution
        self._kept: list[tuple[np.ndarray, ...]] = []
        self._last: tuple | None = None  # (x, y, *extra) of the newest point, not yet decided
        self._last_kept = False
        self._s = 0.0
        self._bin = 0

    def add(self, x: np.ndarray, y: np.ndarray, *extra: np.ndarray) -> None:
        cols = (np.asarray(x, np.float64), np.asarray(y, np.float64), *(np.asarray(e) for e in extra))
        if len(cols[0]) and self._last is None:  # the first point of the curve is always kept
            self._last, self._last_kept = tuple(c[0] for c in cols), True
            cols = tuple(c[1:] for c in cols)
        if len(cols[0]) == 0:
            return
        px, py = self._last[0], self._last[1]
        d = np.abs(np.diff(cols[0], prepend=px)) + np.abs(np.diff(cols[1], prepend=py))
        s = np.cumsum(np.concatenate(([self._s], d)))[1:]
        b = np.floor(s / self.resolution).astype(np.int64)
        prev_b = np.concatenate(([self._bin], b[:-1]))
        change = b != prev_b  # between point i-1 (the previous one) and point i
        keep = change.copy()
        keep[:-1] |= change[1:]  # the last point of a bin and the first of the next
        if self._last_kept or change[0]:  # the previous point is an end, or the last point of a bin
            self._kept.append(tuple(np.asarray([v]) for v in self._last))
        idx = np.flatnonzero(keep[:-1])
        if len(idx):
            self._kept.append(tuple(c[idx] for c in cols))
        self._last = tuple(c[-1] for c in cols)
        self._last_kept = bool(keep[-1])
        self._s, self._bin = float(s[-1]), int(b[-1])

    def finish(self, keep: tuple | None = None) -> tuple[np.ndarray, ...]:
        """The kept points, the last point of the curve included; ``keep``: one more point ``(x, y, *extra)``
        to have among them (at its place along the curve: the caller passes its index as the last extra)."""
        parts = list(self._kept)
        if self._last is not None:
            parts.append(tuple(np.asarray([v]) for v in self._last))
        if keep is not None:
            parts.append(tuple(np.asarray([v]) for v in keep))
        if not parts:
            return ()
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


class CurveAccumulator:
    """Exact AU-ROC, AP, F1-max (and AU-PRO) from tables fed in descending order of the scores.

    Args:
        n_pos, n_neg: positives and negatives in all (known beforehand: the tables only say where they lie).
        n_regions: ground-truth regions for the PRO (None: no AU-PRO, e.g. image scores).
        fpr_limit: upper FPR limit of the AU-PRO integral.
        resolution: keep the curve points at this resolution (None: metrics only).
    """

    def __init__(
        self,
        n_pos: int,
        n_neg: int,
        n_regions: int | None = None,
        fpr_limit: float = 0.3,
        resolution: float | None = None,
    ) -> None:
        self.n_pos, self.n_neg, self.n_regions, self.fpr_limit = int(n_pos), int(n_neg), n_regions, fpr_limit
        self.tp, self.fp, self.w = 0, 0, 0.0  # positives, negatives (and PRO weight) counted so far
        self._point_fp = 0  # false positives at the last curve point (self.fp adds the negatives below it)
        self._auc2 = 0  # twice the ROC area in units of one positive x one negative (exact integer)
        self._ap = 0.0
        self._f1, self._f1_threshold, self._f1_point = -math.inf, math.nan, None
        self._pro_area, self._pro_done, self._pro_point = 0.0, False, (0.0, 0.0)
        self._pro_limit_point: tuple[float, float] | None = None
        self._n_pr = 0  # distinct positive scores seen (index of the next PR point)
        self.curves = resolution is not None
        if self.curves:
            self._roc, self._pr, self._pro = Thinner(resolution), Thinner(resolution), Thinner(resolution)
            self._roc.add(np.zeros(1), np.zeros(1))
            if n_regions is not None:
                self._pro.add(np.zeros(1), np.zeros(1))

    def add(
        self,
        above: int,
        values: np.ndarray,
        count: np.ndarray,
        equal: np.ndarray,
        below: np.ndarray,
        weight: np.ndarray | None = None,
    ) -> None:
        """One table (see the module docstring), its scores descending and below those already added."""
        fp0 = self.fp + int(above)
        if len(values) == 0:
            self.fp = fp0
            return
        count, equal, below = (np.asarray(a, np.int64) for a in (count, equal, below))
        tp_at = self.tp + np.cumsum(count)
        tp_above = tp_at - count
        steps = equal + below
        fp_above = fp0 + np.concatenate(([0], np.cumsum(steps[:-1])))
        fp_at = fp_above + equal
        tp_pts = np.stack([tp_above, tp_at], 1).ravel()
        fp_pts = np.stack([fp_above, fp_at], 1).ravel()
        tp_all = np.concatenate(([self.tp], tp_pts))
        fp_all = np.concatenate(([self._point_fp], fp_pts))
        self._auc2 += int(np.sum((tp_all[1:] + tp_all[:-1]) * np.diff(fp_all)))
        self._ap += float(np.sum(count * (tp_at / (tp_at + fp_at))))
        f1 = 2.0 * tp_at / (tp_at + fp_at + self.n_pos)
        best = int(np.argmax(f1))
        if f1[best] > self._f1:  # the first maximum in descending score order, as np.argmax over the whole
            self._f1, self._f1_threshold = float(f1[best]), float(values[best])
            self._f1_point = (self._n_pr + best, int(tp_at[best]), int(fp_at[best]))
        if self.curves:
            self._add_curve_points(values, tp_pts, fp_pts, tp_at, fp_at)
        if weight is not None and self.n_regions and self.n_neg:
            w_at = self.w + np.cumsum(np.asarray(weight, np.float64))
            w_above = np.concatenate(([self.w], w_at[:-1]))
            pro = np.stack([w_above, w_at], 1).ravel() / self.n_regions
            self._add_pro(fp_pts / self.n_neg, pro)
            self.w = float(w_at[-1])
        self.tp, self._point_fp, self.fp = int(tp_at[-1]), int(fp_at[-1]), int(fp_at[-1] + below[-1])
        self._n_pr += len(values)

    def _add_curve_points(self, values, tp_pts, fp_pts, tp_at, fp_at) -> None:
        if self.n_neg:
            self._roc.add(fp_pts / self.n_neg, tp_pts / self.n_pos)
        idx = self._n_pr + np.arange(len(values))
        self._pr.add(tp_at / self.n_pos, tp_at / (tp_at + fp_at), np.asarray(values, np.float64), tp_at, fp_at, idx)

    def _add_pro(self, fpr: np.ndarray, pro: np.ndarray) -> None:
        """Trapezoid of the PRO curve up to the FPR limit, piece by piece (MVTec AD's ``trapezoid``)."""
        x = np.concatenate(([self._pro_point[0]], fpr))
        y = np.concatenate(([self._pro_point[1]], pro))
        if self.curves:
            self._add_pro_points(x, y)
        self._pro_point = (float(x[-1]), float(y[-1]))
        if self._pro_done:
            return
        seg = 0.5 * (y[1:] + y[:-1]) * np.diff(x)
        over = np.flatnonzero(x[1:] > self.fpr_limit)
        if over.size == 0:
            self._pro_area += float(np.sum(seg))
            return
        j = int(over[0])  # first segment that ends beyond the limit
        self._pro_area += float(np.sum(seg[:j]))
        if x[j] < self.fpr_limit:
            y_lim = y[j] + (y[j + 1] - y[j]) * (self.fpr_limit - x[j]) / (x[j + 1] - x[j])
            self._pro_area += 0.5 * (y_lim + y[j]) * (self.fpr_limit - x[j])
        self._pro_done = True

    def _add_pro_points(self, x: np.ndarray, y: np.ndarray) -> None:
        """The PRO points (``x[0], y[0]`` already added), with the point at the FPR limit among them."""
        x, y = x[1:], y[1:]
        if self._pro_limit_point is None and len(x) and x[-1] > self.fpr_limit:
            prev_x = np.concatenate(([self._pro_point[0]], x))
            prev_y = np.concatenate(([self._pro_point[1]], y))
            y_lim = float(np.interp(self.fpr_limit, prev_x, prev_y))
            at = int(np.searchsorted(x, self.fpr_limit, side="right"))
            self._pro_limit_point = (self.fpr_limit, y_lim)
            x, y = np.insert(x, at, self.fpr_limit), np.insert(y, at, y_lim)
        self._pro.add(x, y)

    def finish(self) -> dict[str, Any]:
        """The metrics (NaN where undefined: no positive, or no negative) and, with a resolution, the curves."""
        if self.tp != self.n_pos or self.fp != self.n_neg:
            raise AssertionError(
                f"tables covered {self.tp} of {self.n_pos} positives and {self.fp} of {self.n_neg} negatives"
            )
        if self.n_pos == 0 or self.n_neg == 0:  # undefined: AP and F1-max would be a trivial 1.0
            out: dict[str, Any] = {"auroc": math.nan, "ap": math.nan, "f1max": math.nan}
        else:
            self._auc2 += (self.n_pos + self.tp) * (self.n_neg - self._point_fp)  # to the (1, 1) end point
            out = {
                "auroc": self._auc2 / (2.0 * self.n_pos * self.n_neg),
                "ap": self._ap / self.n_pos,
                "f1max": self._f1,
            }
        if self.n_regions is not None:
            out["aupro"] = self._finish_pro() if self.n_pos and self.n_neg else math.nan
        if self.curves and self.n_pos:
            out["f1max_threshold"] = self._f1_threshold
            out["curves"] = self._finish_curves(out)
        return out

    def _finish_pro(self) -> float:
        # MVTec's end points: (1, PRO at the lowest score) once every negative is counted, then (1, 1)
        self._add_pro(np.array([1.0, 1.0]), np.array([self.w / self.n_regions, 1.0]))
        return self._pro_area / self.fpr_limit

    def _finish_curves(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """ROC, PR (and PRO) points kept at the resolution, as plain arrays."""
        out: dict[str, Any] = {"n_pos": self.n_pos, "n_neg": self.n_neg}
        if self.n_neg:
            self._roc.add(np.ones(1), np.ones(1))
            fpr, tpr = self._roc.finish()
            out["roc"] = {"fpr": fpr, "tpr": tpr}
        n, tp, fp = self._f1_point
        best = (tp / self.n_pos, tp / (tp + fp), self._f1_threshold, tp, fp, n)
        recall, precision, threshold, tp_at, fp_at, idx = self._pr.finish(keep=best)
        order = np.unique(idx, return_index=True)[1]  # along the curve, the F1-max point once
        out["pr"] = {
            "recall": recall[order],
            "precision": precision[order],
            "threshold": threshold[order],
            "tp": tp_at[order],
            "fp": fp_at[order],
        }
        if self.n_regions is not None and self.n_neg:
            fpr, pro = self._pro.finish()
            out["pro"] = {"fpr": fpr, "pro": pro, "aupro": metrics["aupro"], "fpr_limit": self.fpr_limit}
        return out


def table_from_sorted(
    values: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct values (ascending), their counts and weight sums, from ``values`` sorted ascending."""
    if len(values) == 0:
        return values, np.zeros(0, np.int64), None if weights is None else np.zeros(0)
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
    counts = np.diff(np.append(starts, len(values)))
    sums = None if weights is None else np.add.reduceat(weights, starts)
    return values[starts], counts, sums


SLICE = 1 << 20  # values handled at once where a table or a chunk is cut in pieces (bounds the temporaries)
SORT_SLICE = 1 << 22  # negatives sorted at once by bin_negatives


def bin_negatives(table: np.ndarray, negatives: np.ndarray, out: np.ndarray) -> None:
    """Add the counts of ``negatives`` around the ascending ``table`` of distinct scores to ``out`` ``(2 m + 2,)``.

    Entry ``2 j`` counts the negatives strictly between ``table[j - 1]`` and ``table[j]`` (``j = m``: above
    the last), entry ``2 j + 1`` those equal to ``table[j]``. The negatives are sorted :data:`SORT_SLICE` at
    a time. Where fewer table values than negatives fall in a slice's range, the table values are looked
    up among the sorted negatives; otherwise the negatives among the table, :data:`SLICE` at a time (a
    binary search with ascending keys stays in the cache), and counted by the runs of their sorted slots.
    """
    m = len(table)
    for a in range(0, len(negatives), SORT_SLICE):
        s = np.sort(negatives[a : a + SORT_SLICE])
        lo = int(np.searchsorted(table, s[0], side="left")) if len(s) else 0
        hi = int(np.searchsorted(table, s[-1], side="right")) if len(s) else 0
        if 2 * (hi - lo) < len(s):  # few table values here: where each falls among the negatives
            left = np.searchsorted(s, table[lo:hi], side="left")
            right = np.searchsorted(s, table[lo:hi], side="right")
            out[2 * lo + 1 : 2 * hi : 2] += right - left
            out[2 * lo : 2 * hi : 2] += left - np.concatenate(([0], right[:-1]))
            out[2 * hi] += len(s) - (int(right[-1]) if hi > lo else 0)
            continue
        for b in range(0, len(s), SLICE):
            piece = s[b : b + SLICE]
            j = np.searchsorted(table, piece, side="left")
            key = 2 * j
            inside = j < m
            key[inside] += table[j[inside]] == piece[inside]
            starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))  # keys ascend: count their runs
            out[key[starts]] += np.diff(np.append(starts, len(key)))


def descending_table(
    table: np.ndarray, counts: np.ndarray, sums: np.ndarray | None, binned: np.ndarray
) -> Iterator[dict[str, Any]]:
    """The arguments of :meth:`CurveAccumulator.add` from an ascending table and its :func:`bin_negatives`
    counts, in pieces of :data:`SLICE` values from the top (the accumulator's temporaries stay small)."""
    m = len(table)
    for hi in range(m, 0, -SLICE) if m else [0]:
        lo = max(hi - SLICE, 0)
        yield {
            "above": int(binned[2 * m]) if hi == m else 0,
            "values": table[lo:hi][::-1],
            "count": counts[lo:hi][::-1],
            "equal": binned[2 * lo + 1 : 2 * hi : 2][::-1],
            "below": binned[2 * lo : 2 * hi : 2][::-1],
            "weight": None if sums is None else sums[lo:hi][::-1],
        }
