"""The seven metrics of one class, streamed from its maps chunk by chunk in memory that does not grow with it.

A class is read through a :class:`ClassSource`, which can hand out its ``(maps, masks)`` chunks more than
once; of a class larger than :data:`CLASS_BUDGET` nothing is held but per-image numbers (scores, labels)
and one bounded table.

1. The *scan* reads every chunk once: finite maps, image scores and labels, the number of positive
   (ground-truth) and negative pixels, the ground-truth regions (8-connected, per image) and the area of
   each, the lowest and highest score, and a histogram of the positive scores over the top 16 bits of an
   order-preserving integer key (once they outgrow ``budget``, :data:`POSITIVE_BUDGET`; until then the
   positive scores and their region areas are kept). While the class's scores take at most
   :data:`CLASS_BUDGET` bytes (~1,000 maps of 256x256) they are all kept, negatives too, and the
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
and about 1.4 times the time of the in-memory code. A class within :data:`CLASS_BUDGET` is read once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from scipy import ndimage

from utils.errors import UserError
from utils.memory import release_free_memory
from vlmdiff import scoring
from vlmdiff.evaluation.curves import CurveAccumulator, bin_negatives, descending_table, table_from_sorted

logger = logging.getLogger(__name__)

POSITIVE_BUDGET = 1 << 23  # positive pixels held at once, ~24 bytes each while their table is built
CLASS_BUDGET = 1 << 28  # bytes of scores (and region areas) of a class kept from its one read: it is not read again
LEGACY_NUM_THRESHOLDS = 200
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True  # 8-connected inside one image, never across images
_DIGIT = 16  # key bits resolved per histogram


class ClassSource(Protocol):
    """The maps and masks of one class, readable more than once, in chunks of whole images."""

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """``{"maps": (b, H, W) float, "masks": (b, H, W)}`` (and ``"ids"`` (b,) where known), every image once.

        Before it reads the next chunk it calls :func:`utils.memory.release_free_memory`: the caller's work on
        the last one is freed by then, and returning those pages keeps a long class from growing the heap."""
        ...


@dataclass
class ArrayClass:
    """A :class:`ClassSource` over arrays already in memory, ``batch`` images a chunk (views, no copies)."""

    maps: Any
    masks: Any
    batch: int = 64

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        for a in range(0, len(self.maps), self.batch):
            yield {"maps": self.maps[a : a + self.batch], "masks": self.masks[a : a + self.batch]}
            release_free_memory()  # what the caller did with the chunk is freed: keep the heap from growing


# --------------------------------------------------------------------------- inputs
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def binarize_masks(masks: Any, mask_threshold: float = 0.0) -> np.ndarray:
    """Ground truth ``(N, H, W)`` bool from masks in any of the supported encodings.

    ``mask_threshold`` is a fraction of the mask's full scale, so 0 means "any positive value" for
    every encoding: uint8 masks (0..255) give ``mask > 255 * t``; bool, 0/1 integer and float
    masks (0..1) give ``mask > t``. Float masks outside [0, 1] and integer masks other than uint8
    with values outside {0, 1} are refused (ambiguous scale).
    """
    m = _to_numpy(masks)
    if not 0.0 <= mask_threshold < 1.0:
        raise UserError(f"mask_threshold must be in [0, 1) (a fraction of the mask's full scale), got {mask_threshold}")
    if m.dtype == np.bool_:
        return m
    if m.dtype == np.uint8:
        return m > 255.0 * mask_threshold
    if m.size and (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        lo, hi = m.min(), m.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise UserError(
                f"masks of dtype {m.dtype} must lie in [0, 1] (found {lo}..{hi}); pass 0..255 masks as uint8"
            )
        return m > mask_threshold
    if m.size == 0:
        return m.astype(bool)
    raise UserError(f"masks have unsupported dtype {m.dtype}; use uint8 0..255, bool or float 0..1")


# --------------------------------------------------------------------------- keys
def _key_type(dtype: np.dtype) -> tuple[type, int]:
    return (np.uint32, 32) if dtype == np.float32 else (np.uint64, 64)


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers ordered as the finite float32/float64 ``values``.

    Equal values (-0.0 and 0.0 too) get equal keys.
    """
    utype, bits = _key_type(values.dtype)
    raw = (values + values.dtype.type(0)).view(utype)  # + 0 turns -0.0 into 0.0
    sign = utype(1) << utype(bits - 1)
    return np.where(raw & sign, ~raw, raw | sign)


def key_values(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The float values of :func:`order_keys` ``keys``."""
    utype, bits = _key_type(dtype)
    keys = np.asarray(keys, utype)
    sign = utype(1) << utype(bits - 1)
    return np.where(keys & sign, keys ^ sign, ~keys).view(dtype)


# --------------------------------------------------------------------------- one chunk
def _work_dtype(maps: np.ndarray) -> np.dtype:
    """float16 is widened to float32 (exactly), float32 and float64 are kept, other floats become float64."""
    return np.dtype(np.float32) if maps.dtype in (np.float16, np.float32) else np.dtype(np.float64)


@dataclass
class _Chunk:
    maps: np.ndarray  # (b, H, W) work dtype
    gt: np.ndarray  # (b, H, W) bool
    ids: np.ndarray | None

    def regions(self) -> tuple[np.ndarray, int]:
        """Area of the region of every GT pixel (C order, as ``maps[gt]``) and how many regions the chunk has."""
        gt = self.gt[self.gt.reshape(len(self.gt), -1).any(axis=1)]  # images without GT have no region
        lab, n = ndimage.label(gt, structure=_REGION_STRUCTURE)
        r = lab[gt]
        return np.bincount(r, minlength=n + 1)[r].astype(np.int32), n


def _read(
    source: ClassSource, name: str, mask_threshold: float, dtype: np.dtype | None, check: bool = False
) -> Iterator[_Chunk]:
    """The chunks of ``source``: maps in the work dtype (``dtype``, or that of the first chunk), the ground truth
    as bool; ``check``: also refuse maps that are not (N, H, W) floats or not finite (the scan checks once)."""
    first = 0
    for raw in source.chunks():
        maps = raw["maps"]
        maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        if check:
            if maps.ndim != 3:
                raise UserError(f"class {name!r}: maps must have shape (N, H, W), got {maps.shape}")
            if not np.issubdtype(maps.dtype, np.floating):
                raise UserError(f"class {name!r}: maps must be floating point, got {maps.dtype}")
            if not np.isfinite(maps).all():
                raise UserError(
                    f"class {name!r}: maps contain NaN or infinite values (image {first}.."
                    f"{first + len(maps) - 1}); fix the scoring run that produced them"
                )
        work = _work_dtype(maps)
        if dtype is None:
            dtype = work
        elif work != dtype:
            raise UserError(
                f"class {name!r}: maps of {maps.dtype} after maps of another precision; store a class in one dtype"
            )
        gt = binarize_masks(raw["masks"], mask_threshold)
        if gt.shape != maps.shape:
            raise UserError(f"class {name!r}: maps {maps.shape} and masks {gt.shape} differ in shape")
        first += len(maps)
        ids = raw.get("ids")
        yield _Chunk(np.asarray(maps, work), gt, None if ids is None else np.asarray(ids))
        del raw, maps, gt  # dropped before the source's next chunk, which first returns the freed pages


# --------------------------------------------------------------------------- the scan
@dataclass
class Scan:
    """What one read of a class gives (step 1 of the module docstring)."""

    dtype: np.dtype | None = None
    n_pos: int = 0
    n_neg: int = 0
    n_regions: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    hist: np.ndarray | None = None  # of the positives' keys, made when they outgrow the budget
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    map_max: list[np.ndarray] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    held: list[tuple[np.ndarray, np.ndarray]] | None = field(default_factory=list)  # (scores, areas) of positives
    whole: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = field(default_factory=list)  # see _pieces
    whole_bytes: int = 0

    @property
    def bits(self) -> int:
        return _key_type(self.dtype)[1]


def scan(
    source: ClassSource,
    name: str,
    pooling: str | None,
    mask_threshold: float,
    budget: int,
    on_chunk: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> Scan:
    """Step 1 of the module docstring; ``on_chunk`` sees each chunk (maps in the work dtype, bool masks, ids).

    ``pooling`` None: no image scores. While the class's scores (and region areas) take at most
    :data:`CLASS_BUDGET` bytes they are all kept (``Scan.whole``), so the passes need no second read."""
    s = Scan()
    for chunk in _read(source, name, mask_threshold, None, check=True):
        s.dtype = chunk.maps.dtype
        m, gt = chunk.maps, chunk.gt
        s.labels.append(gt.reshape(len(gt), -1).any(axis=1))
        if pooling is not None:
            s.scores.append(scoring.image_score(torch.from_numpy(np.ascontiguousarray(m)), pooling).numpy())
        s.map_max.append(m.reshape(len(m), -1).max(axis=1))
        if chunk.ids is not None:
            s.ids.append(chunk.ids)
        s.lo, s.hi = min(s.lo, float(m.min())), max(s.hi, float(m.max()))
        pos = m[gt]
        s.n_pos += len(pos)
        s.n_neg += gt.size - len(pos)
        areas = np.zeros(0, np.int32)
        if len(pos):
            areas, n = chunk.regions()
            s.n_regions += n
        if s.held is not None and s.n_pos > budget:  # more positives than fit: from now on a histogram of them
            s.hist = _histogram([p for p, _ in s.held], s.bits)
            s.held = None
        if s.held is not None:
            if len(pos):
                s.held.append((pos, areas))
        elif len(pos):
            s.hist += _histogram([pos], s.bits)
        if s.whole is not None:
            s.whole_bytes += m.nbytes + areas.nbytes
            if s.whole_bytes <= CLASS_BUDGET:
                s.whole.append((m[~gt], pos, areas))
            else:
                s.whole = None  # too large to keep: the passes read the class again
        if on_chunk is not None:
            on_chunk({"maps": m, "masks": gt, "ids": chunk.ids})
    if s.dtype is None:
        raise UserError(f"class {name!r} has no images; drop it or fix the class names")
    return s


def _histogram(positives: list[np.ndarray], bits: int) -> np.ndarray:
    """Counts of the scores ``positives`` over the top 16 bits of their keys."""
    hist = np.zeros(1 << _DIGIT, np.int64)
    for pos in positives:
        hist += np.bincount((order_keys(pos) >> (bits - _DIGIT)).astype(np.intp), minlength=1 << _DIGIT)
    return hist


def _pieces(
    s: Scan, source: ClassSource, name: str, mask_threshold: float, need: str = "all"
) -> Iterator[tuple[Any, Any, Any]]:
    """``(negative scores, positive scores, their region areas)`` of each chunk: kept by the scan where the
    class fitted :data:`CLASS_BUDGET`, else read again; when read, only what ``need`` says is computed
    ("negatives", "positives": the scores only, "all"), the rest is None."""
    if s.whole is not None:
        yield from s.whole
        return
    for chunk in _read(source, name, mask_threshold, s.dtype):
        neg = chunk.maps[~chunk.gt] if need != "positives" else None
        pos = chunk.maps[chunk.gt] if need != "negatives" else None
        areas = None
        if need == "all":
            areas = chunk.regions()[0] if len(pos) else np.zeros(0, np.int32)
        yield neg, pos, areas


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
    width = max((st.hi - st.lo) >> _DIGIT, 1)
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
    width = 1 << (s.bits - _DIGIT)
    stretches = _group([(i * width, (i + 1) * width, int(c)) for i, c in enumerate(s.hist)], budget)
    while any(st.refine for st in stretches):  # one more read per 16 bits, only where a bucket is too full
        todo = [st for st in stretches if st.refine]
        hists = [np.zeros(1 << _DIGIT, np.int64) for _ in todo]
        for _, pos, _ in _pieces(s, source, name, mask_threshold, "positives"):
            keys = order_keys(pos)
            for st, h in zip(todo, hists, strict=True):
                shift = (st.hi - st.lo).bit_length() - 1 - _DIGIT  # widths are powers of two >= 2
                offset = keys[_inside(keys, st.lo, st.hi)] - st.lo
                h += np.bincount((offset >> max(shift, 0)).astype(np.intp), minlength=1 << _DIGIT)
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
        keys = np.array(sorted(singles), dtype=_key_type(dtype)[0])
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
            for neg, pos, areas in _pieces(s, source, name, mask_threshold):
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
        for neg, pos, areas in _pieces(s, source, name, mask_threshold, need):
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
