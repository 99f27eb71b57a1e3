"""A class's maps read chunk by chunk (:class:`ClassSource`), and the one scan of them (:func:`scan`).

Step 1 of :mod:`vlmdiff.evaluation.class_metrics`: the scan reads every chunk once and keeps the per-image
numbers, the positive and negative pixel counts, the ground-truth regions and their areas, the score range
and, once the positives outgrow the budget, a histogram of their order-preserving integer keys
(:func:`order_keys`). A class whose scores take at most :data:`CLASS_BUDGET` bytes is kept whole, so the
passes of :mod:`class_metrics` do not read it again (:func:`pieces`).
"""

from __future__ import annotations

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

CLASS_BUDGET = 1 << 28  # bytes of scores (and region areas) of a class kept from its one read: it is not read again
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True  # 8-connected inside one image, never across images
DIGIT = 16  # key bits resolved per histogram


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
def key_type(dtype: np.dtype) -> tuple[type, int]:
    return (np.uint32, 32) if dtype == np.float32 else (np.uint64, 64)


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers ordered as the finite float32/float64 ``values``.

    Equal values (-0.0 and 0.0 too) get equal keys.
    """
    utype, bits = key_type(values.dtype)
    raw = (values + values.dtype.type(0)).view(utype)  # + 0 turns -0.0 into 0.0
    sign = utype(1) << utype(bits - 1)
    return np.where(raw & sign, ~raw, raw | sign)


def key_values(keys: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The float values of :func:`order_keys` ``keys``."""
    utype, bits = key_type(dtype)
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
    whole: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = field(default_factory=list)  # see pieces
    whole_bytes: int = 0

    @property
    def bits(self) -> int:
        return key_type(self.dtype)[1]


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
    hist = np.zeros(1 << DIGIT, np.int64)
    for pos in positives:
        hist += np.bincount((order_keys(pos) >> (bits - DIGIT)).astype(np.intp), minlength=1 << DIGIT)
    return hist


def pieces(
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
