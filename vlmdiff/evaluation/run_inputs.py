"""What a run folder's maps were made from, and the checks that keep a folder to one run.

The manifest (``manifest.json``) identifies the checkpoint, weights, settings and test set by content,
not by path: a node-local copy of the same files is the same run. A run refuses an output folder whose
manifest differs from its own (stale maps from another run or config). The test set is identified in
two places. The manifest holds a hash of the image ids and labels (:func:`data_fingerprint`): another
set of images, or a changed label, is refused. Each map chunk holds, per image, the files its map was
made from (:class:`map_store.SourceFiles`): before resuming and before
``--run_eval_only`` evaluates, the images that have maps are compared with their files now
(:func:`check_sources`), so an image or mask changed after its map was stored is refused by name, while a
file repaired before it got a map resumes cleanly. A folder whose manifest was written but which holds
no map yet (a crash before the first batch) takes the new run's manifest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.io import read_json, write_json
from vlmdiff.evaluation.map_store import MapStore, SourceFiles
from vlmdiff.evaluation.run_folder import RunFolder

log = logging.getLogger(__name__)

MANIFEST = RunFolder.MANIFEST
LOCATION_KEYS = frozenset({"path", "data_path"})  # where the files were: recorded, never compared


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
    run = RunFolder(output_dir)
    path = run.manifest
    if path.is_file():
        old = read_json(path)
        diff = _first_difference(old, manifest)
        if diff and not MapStore(run.maps).classes():
            log.info("%s holds no map yet: replacing its manifest (%s)", output_dir, diff)
            write_json(path, manifest)
        elif diff:
            raise UserError(_stale_message(output_dir, diff, old))
        return
    if run.maps.exists() and any(run.maps.iterdir()):
        raise UserError(f"{run.maps} holds maps without a {MANIFEST}: use another --output_dir")
    write_json(path, manifest)


def check_data(output_dir: Path, records: Sequence[Any]) -> None:
    """Before evaluating stored maps: the test set is the one the maps were stored for, and the images
    and masks of the stored maps are unchanged (:func:`check_sources`)."""
    old = read_json(RunFolder(output_dir).manifest)
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
    check_sources(MapStore(RunFolder(output_dir).maps), records, source_files(records))


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
    run = RunFolder(output_dir)
    if diff.startswith("data.fingerprint") and _old_fingerprint(old.get("data", {}).get("fingerprint")):
        return (
            f"{run.manifest} was written by an older version of test.py, whose data fingerprint "
            f"cannot be checked by this one; finish that run with the older version, or remove "
            f"{run.maps} and score again, or use another --output_dir"
        )
    if diff.startswith("data.fingerprint.ids_labels"):
        return (
            f"the test set changed since the maps in {output_dir} were stored (image ids or labels differ); "
            f"remove {run.maps} and score again, or use another --output_dir"
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


def manifest_for(
    *,
    checkpoint: str,
    config: dict,
    reconstruction: dict[str, Any],
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
        "reconstruction": reconstruction,
        "feature_extractor": features,
        "data": data,
        "map_dtype": map_dtype,
        "sigma": sigma,
        "precision": precision,
    }
