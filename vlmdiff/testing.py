"""The test stage: score a test set into a map store, then evaluate it (test.py is the CLI).

Output folder::

    manifest.json            what the maps depend on (checkpoint, config, settings, data, extractor)
    maps/{class}/{chunk}.npz per-image anomaly maps, masks, labels, image scores (vlmdiff.map_store)
    panels/{class}/*.png     with --save_visuals: input | autoencoder | sample, written while scoring
    visuals/{class}/*.png    with --save_visuals: the finished, titled strips (vlmdiff.visuals)
    log_image_{exp_name}/    with --save_visuals: upstream's per-image files (vlmdiff.visuals.write_upstream_visuals)
    metrics.json / .csv / .md, curves.json, thresholds.json   (labelled data)
    scores.csv               one row per image: label, score, paths (and decision with --threshold_from)
    masks/{class}/*.png      with --threshold_from: map >= the pixel threshold
    report.html, report/     the report page (vlmdiff.report)

A run refuses an output folder whose manifest differs from its own (stale maps from another run or
config), resumes by skipping images that already have a map, and names each chunk by the global
index of its first image, so shards, ranks and restarts never collide. The manifest identifies the
checkpoint, weights and test set by content, not by path: a node-local copy of the same files is the
same run. The test set is identified in two places. The manifest holds a hash of the image ids and
labels (:func:`data_fingerprint`): another set of images, or a changed label, is refused. Each map
chunk holds, per image, the files its map was made from (:class:`vlmdiff.map_store.SourceFiles`:
image file size, sha256 of the mask file): before resuming and before ``--run_eval_only``
evaluates, the images that have maps are compared with their files now (:func:`check_sources`), so
an image or mask changed after its map was stored is refused by name, while a file repaired before it
got a map (a truncated image that stopped the first attempt) resumes cleanly. A folder whose manifest
was written but which holds no map yet (a crash before the first batch) takes the new run's manifest.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from utils.errors import UserError
from utils.io import atomic_open, read_json, write_json, write_text
from utils.progress import DEFAULT_INTERVAL_S
from utils.progress import progress as progress_meter
from vlmdiff import metrics as M
from vlmdiff import plots as P
from vlmdiff.map_store import MapStore, SourceFiles
from vlmdiff.reconstruction import ReconstructionSettings, reconstruct
from vlmdiff.scoring import anomaly_map, image_score
from vlmdiff.thresholds import class_thresholds, decide, thresholds_record, write_thresholds
from vlmdiff.visuals import DisplaySample, finish_class, save_png, visual_path, write_strips, write_upstream_visuals

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCATION_KEYS = frozenset({"path", "data_path"})  # where the files were: recorded, never compared
CURVES = "curves.json"


def file_fingerprint(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Identity of a weights file: size and a hash of its first and last MiB (plus its absolute path, not compared)."""
    if path is None:
        return None
    import hashlib

    p = Path(path).resolve()
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return {"path": str(p), "size": size, "sha256_head_tail": h.hexdigest()[:16]}


def data_fingerprint(records: Sequence[Any]) -> dict[str, Any]:
    """Identity of a test set as a set: a hash of its image ids and labels (the manifest's ``data.fingerprint``).

    Paths do not enter, so a copy of the dataset elsewhere has the same fingerprint. The files
    themselves are identified per image, beside each map (:func:`source_files`).
    """
    import hashlib

    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.id):
        h.update(f"{r.id}\0{r.label}\n".encode("utf-8", "surrogateescape"))
    return {"ids_labels": h.hexdigest()[:16]}


def source_files(records: Sequence[Any]) -> dict[str, SourceFiles]:
    """``{image id: SourceFiles}`` of the test set now: each image's file size and its mask's sha256.

    Masks are hashed in full (they are small); images by size only, since reading every image would
    cost a scoring pass. A file that cannot be read is a :class:`UserError` naming it.
    """
    import hashlib

    out = {}
    for r in records:
        try:
            size = Path(r.image_path).stat().st_size
            mask = "" if r.mask_path is None else hashlib.sha256(Path(r.mask_path).read_bytes()).hexdigest()[:16]
        except OSError as e:
            raise UserError(f"cannot read {e.filename}: {e.strerror or e}") from e
        out[r.id] = SourceFiles(size, mask)
    return out


def check_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the run's manifest, or check that the folder's existing one describes the same run."""
    path = output_dir / MANIFEST
    if path.is_file():
        old = read_json(path)
        diff = _first_difference(old, manifest)
        if diff and not MapStore(output_dir / "maps").classes():
            log.info("%s holds no map yet: replacing its manifest (%s)", output_dir, diff)
            write_json(path, manifest)
        elif diff:
            raise UserError(_stale_message(output_dir, diff, old))
        return
    if (output_dir / "maps").exists() and any((output_dir / "maps").iterdir()):
        raise UserError(f"{output_dir}/maps holds maps without a {MANIFEST}: use another --output_dir")
    write_json(path, manifest)


def check_data(output_dir: Path, records: Sequence[Any]) -> None:
    """Before evaluating stored maps: the test set is the one the maps were stored for, and the images
    and masks of the stored maps are unchanged (:func:`check_sources`)."""
    old = read_json(output_dir / MANIFEST)
    stored = old.get("data", {}).get("fingerprint")
    if stored is None:
        log.warning(
            "%s: the manifest has no data fingerprint (an older run); the test set is not checked against it",
            output_dir,
        )
    elif _old_fingerprint(stored):
        log.warning(
            "%s: the manifest's data fingerprint is an older version's (sizes and masks of all images in "
            "one hash); the test set is not checked against it",
            output_dir,
        )
    else:
        diff = _first_difference(
            {"data": {"fingerprint": stored}}, {"data": {"fingerprint": data_fingerprint(records)}}
        )
        if diff:
            raise UserError(_stale_message(output_dir, diff, old))
    check_sources(MapStore(output_dir / "maps"), records, source_files(records))


def check_sources(store: MapStore, records: Sequence[Any], now: Mapping[str, SourceFiles]) -> None:
    """The images that have maps in ``store`` still have the files their maps were made from.

    ``now``: :func:`source_files` of ``records``. Images without a map are not compared (a file
    repaired before its map was made is fine). Chunks of older versions record no files: their
    images are skipped with a warning. A difference is a :class:`UserError` naming the first image.
    """
    stored, unknown = store.sources()
    if unknown:
        log.warning(
            "%d map chunk(s) in %s (e.g. %s) were written by an older version and do not record the files "
            "their maps were made from: their images are not checked for changes",
            len(unknown),
            store.root,
            unknown[0],
        )
    by_id = {r.id: r for r in records}
    changed = sorted(i for i, was in stored.items() if i in now and now[i] != was)
    if not changed:
        return
    first, was, is_now = by_id[changed[0]], stored[changed[0]], now[changed[0]]
    what = []
    if was.image_size != is_now.image_size:
        what.append(f"its image file {first.image_path} is {is_now.image_size} bytes now, {was.image_size} then")
    if was.mask_sha256 and is_now.mask_sha256 and was.mask_sha256 != is_now.mask_sha256:
        what.append(f"its mask file {first.mask_path} has another content")
    elif was.mask_sha256 != is_now.mask_sha256:
        what.append(
            f"it has a mask file {first.mask_path} now, none then"
            if is_now.mask_sha256
            else "it had a mask file then, none now"
        )
    more = f" ({len(changed)} images with maps changed)" if len(changed) > 1 else ""
    out = store.root.parent
    raise UserError(
        f"test image {first.id} changed since its map in {out} was stored: {' and '.join(what)}{more}; "
        f"remove {store.root} and score again, or use another --output_dir"
    )


def _old_fingerprint(fingerprint: Any) -> bool:
    """Whether a manifest's data fingerprint is the older one (``images``: ids, labels, sizes; ``masks``)."""
    return isinstance(fingerprint, dict) and "images" in fingerprint and "ids_labels" not in fingerprint


def _stale_message(output_dir: Path, diff: str, old: dict[str, Any]) -> str:
    if diff.startswith("data.fingerprint") and _old_fingerprint(old.get("data", {}).get("fingerprint")):
        return (
            f"{output_dir / MANIFEST} was written by an older version of test.py, whose data fingerprint "
            f"cannot be checked by this one; finish that run with the older version, or remove "
            f"{output_dir / 'maps'} and score again, or use another --output_dir"
        )
    if diff.startswith("data.fingerprint.ids_labels"):
        return (
            f"the test set changed since the maps in {output_dir} were stored (image ids or labels differ); "
            f"remove {output_dir / 'maps'} and score again, or use another --output_dir"
        )
    return f"{output_dir} holds maps of another run ({diff}); use another --output_dir or remove that folder"


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted((set(a) | set(b)) - LOCATION_KEYS):
            d = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else k)
            if d:
                return d
        return None
    return None if a == b else f"{key}: {a!r} there, {b!r} now"


def shard_indices(n: int, start: int, end: int | None, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of the sorted test set this process scores: [start, end) interleaved over ranks."""
    if start < 0:
        raise UserError(f"--start_ind {start} must be >= 0")
    if end is not None and end >= 0 and start > end:
        raise UserError(f"--start_ind {start} is greater than --end_ind {end}")
    if start > n:
        raise UserError(f"--start_ind {start} is past the end of the test set ({n} images)")
    end = n if end is None or end < 0 else min(end, n)
    return list(range(start, end))[rank::world]


@torch.no_grad()
def score_images(
    model,
    extractor,
    dataset,
    indices: Sequence[int],
    store: MapStore,
    settings: ReconstructionSettings,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sigma: float = 5.0,
    visuals: Path | None = None,
    autocast_dtype: torch.dtype | None = None,
    pooling: str = "paper",
    progress: bool = True,
    bar: bool = True,
    log_interval: float = DEFAULT_INTERVAL_S,
    upstream_visuals: Path | None = None,
    sources: Mapping[str, SourceFiles] | None = None,
) -> int:
    """Reconstruct, extract features, map and store the images ``indices`` of ``dataset`` not yet stored.

    ``visuals`` gets our strips, ``upstream_visuals`` upstream's per-image files (both need the autoencoder pass).
    ``sources``: :func:`source_files` of ``dataset.records``; the images already stored are checked
    against it before anything is scored (:func:`check_sources`), and each chunk records it.

    Returns the number of images scored now. Chunks are named by the global index of their first image.
    ``progress``: show it at all (a bar on a terminal when ``bar``, else a log line every ``log_interval`` s).
    """
    done = store.scored_ids()
    if done and sources is not None:
        check_sources(store, dataset.records, sources)
    todo = [i for i in indices if dataset.records[i].id not in done]
    if len(todo) < len(indices):
        log.info("%d of %d images already have maps: resuming", len(indices) - len(todo), len(indices))
    if not todo:
        return 0
    loader = DataLoader(
        Subset(dataset, todo),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    firsts = todo[::batch_size]
    meter = progress_meter(len(todo), "test", "img", enabled=progress, bar=bar, interval_s=log_interval, logger=log)
    for first, batch in zip(firsts, loader, strict=True):
        image = batch["image"].to(device)
        maps, rec = _maps(
            model,
            extractor,
            image,
            list(batch["caption"]),
            list(batch["filename"]),
            settings,
            sigma,
            autocast_dtype,
            decode_autoencoder=visuals is not None or upstream_visuals is not None,
        )
        scores = image_score(maps, pooling)
        store.write(
            f"{first:08d}",
            batch["filename"],
            batch["class_name"],
            maps.cpu(),
            batch["mask"][:, 0],
            batch["label"],
            scores.cpu(),
            None if sources is None else [sources[i] for i in batch["filename"]],
        )
        if visuals is not None:
            write_strips(
                visuals, list(batch["filename"]), list(batch["class_name"]), image, rec["autoencoder"], rec["sample"]
            )
        if upstream_visuals is not None:
            write_upstream_visuals(
                upstream_visuals, list(batch["filename"]), image, rec["autoencoder"], rec["sample"], maps
            )
        meter.update(len(batch["filename"]))
    meter.close()
    return len(todo)


def _maps(
    model,
    extractor,
    image: torch.Tensor,
    captions: list[str],
    ids: list[str],
    settings: ReconstructionSettings,
    sigma: float,
    autocast_dtype: torch.dtype | None,
    decode_autoencoder: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Anomaly maps (B, H, W) and reconstructions of one batch (``autoencoder`` only when asked: visuals).

    On the CPU a batch of one image runs as two copies: oneDNN's convolutions round differently for a
    single image than for a batch (and identically for every batch size above one), so this keeps each
    image's map bit-identical whatever the batch size. On GPUs results agree to float rounding only.
    """
    single = image.shape[0] == 1 and image.device.type == "cpu"
    if single:
        image, captions, ids = image.expand(2, -1, -1, -1), captions * 2, ids * 2
    with torch.autocast(image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        rec = reconstruct(model, image, captions, ids, settings, decode_autoencoder=decode_autoencoder)
        f_in, f_rec = extractor(image), extractor(rec["sample"].to(image.dtype))
    f_in, f_rec = [f.float() for f in f_in], [f.float() for f in f_rec]
    maps = anomaly_map(f_in, f_rec, out_size=tuple(image.shape[-2:]), sigma=sigma)  # (B, H, W)
    if single:
        maps, rec = maps[:1], {k: v[:1] for k, v in rec.items()}
    return maps, rec


def check_coverage(store: MapStore, expected_ids: Iterable[str], output_dir: Path) -> None:
    """Every test image has exactly one map (duplicates are caught by the store) and no stranger does."""
    have = store.scored_ids()
    expected = set(expected_ids)
    missing = sorted(expected - have)
    extra = sorted(have - expected)
    if missing:
        raise UserError(
            f"{output_dir}: {len(missing)} of {len(expected)} test images have no map yet "
            f"(e.g. {missing[0]}); run the missing shards first (--start_ind/--end_ind)"
        )
    if extra:
        raise UserError(
            f"{output_dir}: {len(extra)} maps belong to no image of this test set (e.g. {extra[0]}); "
            "the folder holds another run's maps"
        )


SCORES_COLUMNS = (
    "id",
    "class",
    "label",
    "image_score",
    "map_max",
    "image_path",
    "visual_path",
    "decision",
    "threshold",
    "mask_path",
)


def _score_rows(
    output_dir: Path,
    cls: str,
    ids: np.ndarray,
    labels: np.ndarray | None,
    scores: np.ndarray,
    map_max: np.ndarray,
    image_paths: dict[str, str] | None,
    decided: np.ndarray | None = None,
    threshold: float | None = None,
    masks_written: bool = False,
) -> list[list[str]]:
    """Rows of scores.csv for one class, sorted by id (``labels`` None: unknown; ``decided``: True = anomalous)."""
    rows = []
    for i in np.argsort(ids, kind="stable").tolist():
        image_id = str(ids[i])
        visual = "visuals" / visual_path(cls, image_id)
        mask = "masks" / visual_path(cls, image_id)
        rows.append(
            [
                image_id,
                cls,
                "" if labels is None else str(int(labels[i])),
                f"{scores[i]:.6f}",
                f"{float(map_max[i]):.6f}",
                (image_paths or {}).get(image_id, ""),
                visual.as_posix() if (output_dir / visual).is_file() else "",
                "" if decided is None else ("anomalous" if decided[i] else "normal"),
                "" if threshold is None else f"{threshold:.6f}",
                mask.as_posix() if masks_written else "",
            ]
        )
    return rows


def write_scores(output_dir: Path, rows: list[list[str]]) -> Path:
    """scores.csv: one row per image (:data:`SCORES_COLUMNS`; empty where unknown), sorted by class and id."""
    path = output_dir / "scores.csv"
    with atomic_open(path, "w") as f:
        w = csv.writer(f)
        w.writerow(SCORES_COLUMNS)
        w.writerows(rows)
    return path


def evaluate_run(
    output_dir: Path,
    protocol: str,
    pooling: str,
    mask_threshold: float = 0.0,
    visuals: bool = False,
    dataset_name: str | None = None,
    extra: dict[str, Any] | None = None,
    image_paths: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Metrics from the stored maps, class by class, and everything the report shows, from the same reads.

    Writes metrics.json / .csv / .md, curves.json (the curve points, :mod:`vlmdiff.plots`),
    thresholds.json (F1-max thresholds, :mod:`vlmdiff.thresholds`), scores.csv and, with ``visuals``,
    the finished strips (one more read of each class). Each class is read chunk file by chunk file
    (:meth:`MapStore.class_sources`), so memory does not grow with the size of a class.
    ``image_paths``: {image id: image file} for scores.csv.
    """
    store = MapStore(output_dir / "maps")
    manifest = read_json(output_dir / MANIFEST)
    sources = dict(store.class_sources())
    samples = {cls: DisplaySample(len(source)) for cls, source in sources.items()}
    curves: dict[str, dict[str, Any]] = {}
    rows: list[list[str]] = []
    pooled: list[tuple[np.ndarray, np.ndarray]] = []

    def on_curves(cls: str, c: dict[str, Any]) -> None:
        display = samples.pop(cls).range()
        curves[cls] = P.class_curves(c, display)
        scores, labels, ids = c["image_scores"], c["labels"], c["ids"]
        if visuals:
            finish_class(
                output_dir / "panels",
                output_dir / "visuals",
                cls,
                sources[cls].chunks(),
                display,
                dict(zip(ids.tolist(), scores.tolist(), strict=True)),
            )
        rows.extend(_score_rows(output_dir, cls, ids, labels, scores, c["map_max"], image_paths))
        pooled.append((scores, labels))

    result = M.evaluate_stream(
        sources.items(),
        protocol=protocol,
        image_pooling=pooling,
        mask_threshold=mask_threshold,
        on_curves=on_curves,
        on_chunk=lambda cls, chunk: samples[cls].add(chunk["maps"]),
    )
    by_protocol = result if protocol == "both" else {protocol: result}
    write_json(
        output_dir / "metrics.json",
        {
            "metrics": M._nan_to_none(by_protocol),
            "settings": {"protocol": protocol, "image_pooling": pooling, "mask_threshold": mask_threshold},
            **(extra or {}),
        },
    )
    write_text(output_dir / "metrics.csv", metrics_csv(by_protocol))
    md = [M.format_table(sub, f"{protocol_name} protocol") for protocol_name, sub in by_protocol.items()]
    if dataset_name and dataset_name in M.PAPER_RESULTS:
        md.append(
            f"### mean vs the paper ({dataset_name})\n\n"
            + M.paper_comparison(M.paper_means(by_protocol, "both" if protocol == "both" else None), dataset_name)
        )
    write_text(output_dir / "metrics.md", "\n\n".join(md) + "\n")
    write_json(
        output_dir / CURVES,
        M._nan_to_none(
            {"fpr_limit": M.FPR_LIMIT, "resolution": P.RESOLUTION, "image_pooling": pooling, "classes": curves}
        ),
        indent=None,
    )
    image_overall = P.f1max_threshold(np.concatenate([s for s, _ in pooled]), np.concatenate([y for _, y in pooled]))
    write_thresholds(
        output_dir, thresholds_record(curves, image_overall, P.pooled_pixel_threshold(curves), pooling, manifest)
    )
    write_scores(output_dir, rows)
    return by_protocol


def label_run(
    output_dir: Path,
    pooling: str,
    image_paths: dict[str, str] | None = None,
    visuals: bool = False,
    threshold_record: dict[str, Any] | None = None,
) -> Path:
    """Scores of a run without ground truth: scores.csv, finished strips and, with ``threshold_record``
    (:func:`vlmdiff.thresholds.load_thresholds`), a normal/anomalous decision per image and a binary mask
    PNG (map >= pixel threshold) per image under ``masks/{class}/``. Returns the scores.csv path.
    Each class is read chunk by chunk: once for the scores, again for the masks and strips.
    """
    store = MapStore(output_dir / "maps")
    rows: list[list[str]] = []
    for cls, source in store.class_sources():
        sample = DisplaySample(len(source))
        ids, scores, map_max = [], [], []
        for chunk in source.chunks(("ids", "maps")):
            maps = chunk["maps"].astype(np.float32)
            ids.append(chunk["ids"])
            scores.append(image_score(torch.from_numpy(maps), pooling).numpy())
            map_max.append(maps.reshape(len(maps), -1).max(axis=1))
            sample.add(maps)
        ids_a, scores_a, display = np.concatenate(ids), np.concatenate(scores), sample.range()
        decided, image_t, decisions = None, None, None
        if threshold_record is not None:
            image_t, pixel_t = class_thresholds(threshold_record, cls)
            decided = decide(scores_a, image_t)
            decisions = {
                "image": dict(zip(ids_a.tolist(), decided.tolist(), strict=True)),
                "image_threshold": image_t,
                "pixel_threshold": pixel_t,
            }
            if pixel_t is not None:
                for chunk in source.chunks(("ids", "maps")):
                    for image_id, amap in zip(chunk["ids"].tolist(), chunk["maps"], strict=True):
                        save_png(
                            output_dir / "masks" / visual_path(cls, image_id),
                            ((amap >= pixel_t) * 255).astype(np.uint8),
                        )
        if visuals:
            finish_class(
                output_dir / "panels",
                output_dir / "visuals",
                cls,
                source.chunks(),
                display,
                dict(zip(ids_a.tolist(), scores_a.tolist(), strict=True)),
                decisions,
                labelled=False,
            )
        rows.extend(
            _score_rows(
                output_dir,
                cls,
                ids_a,
                None,
                scores_a,
                np.concatenate(map_max),
                image_paths,
                decided,
                image_t,
                masks_written=decisions is not None and decisions["pixel_threshold"] is not None,
            )
        )
    return write_scores(output_dir, rows)


def metrics_csv(by_protocol: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["protocol", "class", *M.METRICS])
    for protocol, res in by_protocol.items():
        for cls, row in [*res["per_class"].items(), ("mean", res["mean"])]:
            w.writerow([protocol, cls, *("" if math.isnan(row[k]) else f"{row[k]:.6f}" for k in M.METRICS)])
        w.writerow([protocol, "classes in mean", *(res["mean_over"][k] for k in M.METRICS)])
    return buf.getvalue()


def manifest_for(
    *,
    checkpoint: str,
    config: dict,
    settings: ReconstructionSettings,
    extractor: str,
    extractor_weights: str | None,
    data: dict[str, Any],
    map_dtype: str,
    sigma: float,
    precision: str,
    extractor_input_size: int | None = None,
) -> dict[str, Any]:
    features = {"name": extractor, "weights": file_fingerprint(extractor_weights)}
    if extractor_input_size is not None:
        features["input_size"] = extractor_input_size
    return {
        "checkpoint": file_fingerprint(checkpoint),
        "config": config,
        "reconstruction": asdict(settings),
        "feature_extractor": features,
        "data": data,
        "map_dtype": map_dtype,
        "sigma": sigma,
        "precision": precision,
    }
