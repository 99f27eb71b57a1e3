"""Evaluate anomaly maps: the seven paper metrics per class and their mean over classes.

Input: an .npz with arrays ``maps`` (or ``preds``) [N, H, W] float, ``masks`` [N, H, W]
(uint8 0..255, bool, or float 0..1) and ``class_names`` (or ``clsname``) [N] strings.
Output: a table (percent) of image AU-ROC / AP / F1-max, pixel AU-ROC / AP / F1-max and AU-PRO
(FPR limit 0.3) per class plus the mean row, and optionally a JSON file (fractions, NaN as null).

Protocols: "official" (scikit-learn AUROC/AP, F1-max over every threshold, exact MVTec AD AU-PRO;
the default), "legacy" (the DiAD/VLMDiff metric code: AUROCs below 0.5 flipped, 200-threshold
AU-PRO normalised by its largest FPR below 0.3), or "both".
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.cli import HelpFormatter, run_main, setup_logging
from utils.errors import UserError
from utils.io import write_json
from vlmdiff import scoring
from vlmdiff.evaluation.array_metrics import FPR_LIMIT
from vlmdiff.evaluation.class_metrics import (  # noqa: F401  (public here too)
    LEGACY_NUM_THRESHOLDS,
    POSITIVE_BUDGET,
    evaluate_source,
)
from vlmdiff.evaluation.class_scan import ArrayClass, ClassSource, _to_numpy, binarize_masks  # noqa: F401
from vlmdiff.evaluation.curves import RESOLUTION
from vlmdiff.evaluation.metric_table import (  # noqa: F401  (public here too)
    METRICS,
    PAPER_RESULTS,
    compare_to_paper,
    format_table,
    legacy_row,
    official_row,
    paper_comparison,
    paper_means,
)

logger = logging.getLogger(__name__)

PROTOCOLS = ("official", "legacy", "both")


# --------------------------------------------------------------------------- evaluation
def _protocols(protocol: str) -> tuple[str, ...]:
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return ("official", "legacy") if protocol == "both" else (protocol,)


def evaluate_class(
    name: str,
    maps: Any,
    masks: Any,
    protocol: str = "official",
    image_pooling: str = "paper",
    mask_threshold: float = 0.0,
) -> dict[str, dict[str, float]]:
    """The seven metrics of one class: ``{protocol: {metric: value}}`` (one entry per protocol).

    ``maps`` ``(N, H, W)`` float, ``masks`` ``(N, H, W)`` (see :func:`binarize_masks`). Image
    label = the binarised mask has a positive pixel; image score = :func:`scoring.image_score`.
    Metrics that are undefined for this class (no anomalous image / pixel, no normal image /
    pixel) are NaN and logged as a warning.
    """
    return _evaluate_class(name, ArrayClass(_to_numpy(maps), masks), protocol, image_pooling, mask_threshold)


def _evaluate_class(
    name: str,
    source: ClassSource,
    protocol: str,
    image_pooling: str,
    mask_threshold: float,
    on_curves: Callable[[str, dict[str, Any]], None] | None = None,
    on_chunk: Callable[[dict[str, np.ndarray]], None] | None = None,
    budget: int = POSITIVE_BUDGET,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_class` over a :class:`class_scan.ClassSource`. ``on_curves(name, curves)``
    also receives ``{"image": ranking_metrics(..., keep_curves=True), "pixel": pixel_metrics(...,
    keep_curves=True), "image_scores": (N,), "labels": (N,) bool, "map_max": (N,), "ids": (N,) or None}``
    (per-image arrays in chunk order); ``on_chunk(chunk)`` sees each chunk once (see
    :func:`class_metrics.evaluate_source`)."""
    protocols = _protocols(protocol)
    res = evaluate_source(
        name,
        source,
        legacy="legacy" in protocols,
        pooling=image_pooling,
        mask_threshold=mask_threshold,
        fpr_limit=FPR_LIMIT,
        budget=budget,
        resolution=RESOLUTION if on_curves is not None else None,
        on_chunk=on_chunk,
    )
    img, pix, labels = res["image"], res["pixel"], res["labels"]
    official = official_row(res)
    undefined = [k for k, v in official.items() if math.isnan(v)]
    if undefined:
        logger.warning(
            "class %r: %s undefined (NaN): %d of %d images anomalous, %d of %d pixels anomalous",
            name,
            ", ".join(undefined),
            int(labels.sum()),
            len(labels),
            res["n_pos"],
            res["n_pixels"],
        )
    if on_curves is not None:
        on_curves(
            name,
            {
                "image": img,
                "pixel": pix,
                "image_scores": res["image_scores"],
                "labels": labels,
                "map_max": res["map_max"],
                "ids": res["ids"],
            },
        )
    out: dict[str, dict[str, float]] = {}
    if "official" in protocols:
        out["official"] = official
    if "legacy" in protocols:
        out["legacy"] = legacy_row(official, res)
    return out


def _mean_rows(per_class: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """The mean over the classes where each metric is defined, and how many classes that is per metric."""
    mean, over = {}, {}
    for k in METRICS:
        vals = [row[k] for row in per_class.values()]
        ok = [v for v in vals if not math.isnan(v)]
        if len(ok) < len(vals):
            logger.warning("mean %s is over %d of %d classes (undefined for the others)", k, len(ok), len(vals))
        mean[k] = float(np.mean(ok)) if ok else math.nan
        over[k] = len(ok)
    return mean, over


def evaluate_stream(
    items: Iterable[tuple],
    protocol: str = "official",
    image_pooling: str = "paper",
    mask_threshold: float = 0.0,
    on_curves: Callable[[str, dict[str, Any]], None] | None = None,
    on_chunk: Callable[[str, dict[str, np.ndarray]], None] | None = None,
    budget: int = POSITIVE_BUDGET,
) -> dict[str, Any]:
    """Evaluate class by class from ``(class_name, maps (N,H,W), masks (N,H,W))`` or
    ``(class_name, ClassSource)`` items (:class:`class_scan.ClassSource`: chunks read again as needed).

    Peak memory does not grow with the number of classes nor with the size of a class read from a
    source: one chunk's work and at most ``budget`` positive pixels (:mod:`class_metrics`).
    Returns ``{"per_class": {cls: {metric: value}}, "mean": {metric: value}, "mean_over": {metric: n}}``
    with fractions as Python floats: NaN where a metric is undefined for a class (no normal or no
    anomalous image / pixel); mean = arithmetic mean over the ``n`` classes where a metric is defined; for
    ``protocol="both"`` ``{"official": <that>, "legacy": <that>}``. Each class may appear once.
    ``on_curves(class_name, curves)`` is called per class with the curve points and per-image numbers the
    metrics were computed from (see :func:`_evaluate_class`), so plots need no second pass over the pixels;
    ``on_chunk(class_name, chunk)`` sees every chunk of the first read of a class.
    """
    protocols = _protocols(protocol)
    rows: dict[str, dict[str, dict[str, float]]] = {p: {} for p in protocols}
    for item in items:
        name, source = str(item[0]), (item[1] if len(item) == 2 else ArrayClass(_to_numpy(item[1]), item[2]))
        if name in rows[protocols[0]]:
            raise UserError(f"class {name!r} appears twice in the evaluation stream; pass each class once")
        chunk_hook = None if on_chunk is None else (lambda chunk, name=name: on_chunk(name, chunk))
        for p, row in _evaluate_class(
            name, source, protocol, image_pooling, mask_threshold, on_curves, chunk_hook, budget
        ).items():
            rows[p][name] = {k: float(v) for k, v in row.items()}
        logger.info("evaluated class %s", name)
    if not rows[protocols[0]]:
        raise UserError("nothing to evaluate: no classes given")
    result = {}
    for p in protocols:
        mean, over = _mean_rows(rows[p])
        result[p] = {"per_class": rows[p], "mean": mean, "mean_over": over}
    return result if protocol == "both" else result[protocol]


def evaluate(
    maps: Any,
    masks: Any,
    class_names: Sequence[str],
    protocol: str = "official",
    image_pooling: str = "paper",
    mask_threshold: float = 0.0,
) -> dict[str, Any]:
    """The seven metrics per class and their mean (see :func:`evaluate_stream` for the result).

    Args:
        maps: ``(N, H, W)`` anomaly maps, numpy or torch, any float dtype.
        masks: ``(N, H, W)`` uint8 0..255, bool, or float 0..1 (see :func:`binarize_masks`).
        class_names: ``N`` class names; classes are reported in order of first appearance.
        protocol: "official", "legacy" or "both".
        image_pooling: "paper", "ader" or "max" (see :func:`scoring.image_score`).
        mask_threshold: ground truth = mask > this fraction of the mask's full scale.
    """
    m, k = _to_numpy(maps), _to_numpy(masks)
    names = np.asarray([str(c) for c in _to_numpy(class_names).ravel()])
    if m.ndim != 3 or m.shape != k.shape or len(names) != len(m):
        raise UserError(
            f"maps {m.shape}, masks {k.shape} and class_names ({len(names)}) must be (N, H, W), (N, H, W) and N"
        )
    _, first = np.unique(names, return_index=True)

    def items() -> Iterator[tuple[str, ClassSource]]:
        for cls in names[np.sort(first)]:
            idx = np.flatnonzero(names == cls)
            if idx[-1] - idx[0] + 1 == len(idx):  # contiguous: views, no copy
                sel: Any = slice(int(idx[0]), int(idx[-1]) + 1)
            else:
                sel = idx
            yield str(cls), ArrayClass(m[sel], k[sel])

    return evaluate_stream(items(), protocol, image_pooling, mask_threshold)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and math.isnan(obj) else obj


# --------------------------------------------------------------------------- command line
def load_inputs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(maps, masks, class_names)`` from an .npz with ``maps|preds``, ``masks``, ``class_names|clsname``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {}
            for role, names in (
                ("maps", ("maps", "preds")),
                ("masks", ("masks",)),
                ("class_names", ("class_names", "clsname")),
            ):
                found = next((n for n in names if n in data.files), None)
                if found is None:
                    raise UserError(
                        f"{path}: no array {' or '.join(repr(n) for n in names)} "
                        f"(arrays present: {', '.join(data.files) or 'none'})"
                    )
                arrays[role] = data[found]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz of plain arrays ({e}); save it with numpy.savez") from e
    if arrays["maps"].ndim != 3 or arrays["masks"].shape != arrays["maps"].shape:
        raise UserError(f"{path}: maps {arrays['maps'].shape} and masks {arrays['masks'].shape} must both be (N, H, W)")
    if arrays["class_names"].shape != (len(arrays["maps"]),):
        raise UserError(
            f"{path}: class_names has shape {arrays['class_names'].shape}, expected ({len(arrays['maps'])},)"
        )
    return arrays["maps"], arrays["masks"], arrays["class_names"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vlmdiff.evaluation.metrics", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("file", help=".npz with maps (or preds), masks, class_names (or clsname)")
    p.add_argument(
        "--protocol",
        "--metrics_protocol",
        choices=PROTOCOLS,
        default="official",
        help="official (scikit-learn, MVTec AU-PRO), legacy (upstream's metric code) or both",
    )
    p.add_argument(
        "--image_pooling",
        choices=scoring.POOLINGS,
        default="paper",
        help="image score: paper = max after 8 x avgpool 8; ader = max after avgpool 16; max = the map's maximum",
    )
    p.add_argument(
        "--mask_threshold",
        type=float,
        default=0.0,
        help="ground truth = mask > this fraction of full scale (255 for uint8, 1 otherwise)",
    )
    p.add_argument(
        "--output", help="write the metrics (fractions, NaN as null) to this JSON file (default: print only)"
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate the .npz named on the command line, print the table(s), optionally write JSON."""
    args = parse_args(argv)
    maps, masks, names = load_inputs(args.file)
    try:
        result = evaluate(maps, masks, names, args.protocol, args.image_pooling, args.mask_threshold)
    except UserError as e:
        raise UserError(f"{args.file}: {e}") from e
    print(format_table(result, title=Path(args.file).name))
    if args.output:
        settings = {
            "input": str(args.file),
            "protocol": args.protocol,
            "image_pooling": args.image_pooling,
            "mask_threshold": args.mask_threshold,
        }
        write_json(args.output, _nan_to_none({"settings": settings, **result}))
    return result


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_main(main))
