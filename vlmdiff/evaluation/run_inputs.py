"""What a run folder's maps were made from, and the checks that keep a folder to one run.

The manifest (``manifest.json``) identifies the checkpoint, weights, settings and test set by content,
not by path: a node-local copy of the same files is the same run. The checkpoint is identified by the
digest of its weights (:func:`ldm.checkpoint.weights_digest`, stored in every checkpoint this project
writes), the test captions by a digest of each image's caption (:func:`captions_record`). A run
refuses an output folder whose manifest differs from its own (stale maps from another run or config),
naming what differs. The test set is identified in two places. The manifest holds a hash of the image
ids and labels (:func:`data_fingerprint`): another set of images, or a changed label, is refused. Each
map chunk holds, per image, the files its map was made from (:class:`map_store.SourceFiles`: the
sha256 of the image file and of its mask): before resuming and before ``--run_eval_only`` evaluates,
the images that have maps are compared with their files now (:func:`check_sources`), so an image or
mask changed after its map was stored is refused by name, while a file repaired before it got a map
resumes cleanly. A folder whose manifest was written but which holds no map yet (a crash before the
first batch) takes the new run's manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.io import read_json, write_json
from vlmdiff.evaluation.map_store import MapStore, SourceFiles
from vlmdiff.evaluation.run_folder import RunFolder

log = logging.getLogger(__name__)

MANIFEST = RunFolder.MANIFEST
LOCATION_KEYS = frozenset({"path", "data_path"})  # where the files were: recorded, never compared
NOT_COMPARED = frozenset({"checkpoint.size"})  # recorded for the reader; the weights digest is what identifies


def file_fingerprint(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Identity of a feature extractor's weights file: the sha256 of its bytes (and its path, not compared)."""
    if path is None:
        return None
    p = Path(path).resolve()
    return {"path": str(p), "sha256": _sha256_of_file(p, 64)}


def checkpoint_record(path: str | os.PathLike, digest: str) -> dict[str, Any]:
    """The manifest's ``checkpoint``: the digest of its weights (compared), its absolute path and size (not
    compared: a copy, or an export of the same weights in another format, is the same checkpoint)."""
    from ldm.checkpoint import DIGEST_KEY

    p = Path(path).resolve()
    return {"path": str(p), "size": p.stat().st_size, DIGEST_KEY: digest}


def captions_record(captions: Mapping[str, str] | None, source: Any = None) -> dict[str, Any] | None:
    """The manifest's ``data.captions``: a sha256 of the sorted (image id, caption) pairs the images are
    guided by, their number, and where they came from (``path``, not compared: the caption file when they
    came from one, else the folder; ``source`` is the loaded caption map); None without captions."""
    if captions is None:
        return None
    h = hashlib.sha256()
    for image_id in sorted(captions):
        h.update(f"{image_id}\0{captions[image_id]}\n".encode("utf-8", "surrogateescape"))
    files = sorted({str(f) for f in getattr(source, "sources", {}).values()})
    origin = files[0] if len(files) == 1 else getattr(source, "origin", None)
    return {"path": None if origin is None else str(origin), "n": len(captions), "sha256": h.hexdigest()[:16]}


def _sha256_of_file(path: str | os.PathLike, digits: int = 16) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:digits]


def data_fingerprint(records: Sequence[Any]) -> dict[str, Any]:
    """Identity of a test set as a set: a hash of its image ids and labels (the manifest's ``data.fingerprint``).

    Paths do not enter, so a copy of the dataset elsewhere has the same fingerprint. The files
    themselves are identified per image, beside each map (:func:`source_files`).
    """
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.id):
        h.update(f"{r.id}\0{r.label}\n".encode("utf-8", "surrogateescape"))
    return {"ids_labels": h.hexdigest()[:16]}


def source_files(records: Sequence[Any], workers: int = 8) -> dict[str, SourceFiles]:
    """``{image id: SourceFiles}`` of the test set now: each image file's size and sha256, its mask's sha256.

    Every file is read once, by ``workers`` threads (hashing releases the GIL; on a network file system
    the reads overlap). A file that cannot be read is a :class:`UserError` naming it.
    """

    def identify(r: Any) -> SourceFiles:
        try:
            mask = "" if r.mask_path is None else _sha256_of_file(r.mask_path)
            return SourceFiles(Path(r.image_path).stat().st_size, mask, _sha256_of_file(r.image_path))
        except OSError as e:
            raise UserError(f"cannot read {e.filename}: {e.strerror or e}") from e

    if len(records) < 2 or workers <= 1:
        return {r.id: identify(r) for r in records}
    with ThreadPoolExecutor(min(workers, len(records))) as pool:
        return {r.id: s for r, s in zip(records, pool.map(identify, records), strict=True)}


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
            raise UserError(_stale_message(output_dir, diff, old, manifest))
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
    by_size = sum(1 for i, was in stored.items() if i in now and not was.image_sha256)
    if by_size:
        log.warning(
            "%d image(s) with maps in %s were stored by an older version that identified images by file size: "
            "a changed image of the same size is not noticed for them",
            by_size,
            store.root,
        )
    by_id = {r.id: r for r in records}
    changed = sorted(i for i, was in stored.items() if i in now and _changed(was, now[i]))
    if not changed:
        return
    first, was, is_now = by_id[changed[0]], stored[changed[0]], now[changed[0]]
    what = []
    if was.image_size != is_now.image_size:
        what.append(f"its image file {first.image_path} is {is_now.image_size} bytes now, {was.image_size} then")
    elif was.image_sha256 and was.image_sha256 != is_now.image_sha256:
        what.append(f"its image file {first.image_path} is another picture now (same size, other content)")
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


def _changed(was: SourceFiles, now: SourceFiles) -> bool:
    """Whether an image's files differ from those its map was made from (by size only where ``was`` has no
    image hash: chunks of older versions)."""
    return (
        was.image_size != now.image_size
        or was.mask_sha256 != now.mask_sha256
        or bool(was.image_sha256)
        and was.image_sha256 != now.image_sha256
    )


def _old_fingerprint(fingerprint: Any) -> bool:
    """Whether a manifest's data fingerprint is the older one (``images``: ids, labels, sizes; ``masks``)."""
    return isinstance(fingerprint, dict) and "images" in fingerprint and "ids_labels" not in fingerprint


def _stale_message(output_dir: Path, diff: str, old: dict[str, Any], new: dict[str, Any] | None = None) -> str:
    from ldm.checkpoint import DIGEST_KEY

    run = RunFolder(output_dir)
    maps = run.maps
    was_ckpt, now_ckpt = old.get("checkpoint") or {}, (new or {}).get("checkpoint") or {}
    if diff.startswith("checkpoint") and "sha256_head_tail" in was_ckpt and DIGEST_KEY not in was_ckpt:
        return (
            f"{run.manifest} was written by an older version of test.py, which identified the "
            f"checkpoint by its size and first and last MiB only; finish that run with the older version, or "
            f"remove {maps} and score again, or use another --output_dir"
        )
    if diff.startswith(f"checkpoint.{DIGEST_KEY}"):
        return (
            f"{output_dir} holds maps of another run, made from other weights than those of {now_ckpt.get('path')} "
            f"(weights sha256 {str(was_ckpt.get(DIGEST_KEY))[:12]}... from {was_ckpt.get('path')}, "
            f"{str(now_ckpt.get(DIGEST_KEY))[:12]}... now); use another --output_dir, or remove {maps} and "
            "score again"
        )
    if diff.startswith("data.captions"):
        was_caps = old.get("data", {}).get("captions") or {}
        now_caps = (new or {}).get("data", {}).get("captions") or {}
        return (
            f"{output_dir} holds maps of another run, made with other test captions "
            f"({_captions_name(was_caps)} then, {_captions_name(now_caps)} now; check --caption_folder, "
            f"--vlm_model, --prompt_type and --use_captions); use another --output_dir, or remove {maps} and "
            "score again"
        )
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


def _captions_name(record: dict[str, Any]) -> str:
    if not record:
        return "none (empty captions)"
    return f"{record.get('path') or 'captions'} (sha256 {record.get('sha256')})"


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted((set(a) | set(b)) - LOCATION_KEYS):
            full = f"{key}.{k}" if key else k
            d = None if full in NOT_COMPARED else _first_difference(a.get(k), b.get(k), full)
            if d:
                return d
        return None
    return None if a == b else f"{key}: {a!r} there, {b!r} now"


def maps_settings(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``{flag: value}`` of test.py's settings that the stored maps (and masks) of a run were made with:
    what ``--run_eval_only`` cannot change (its own settings, ``--metrics_protocol``, ``--image_pooling``
    and ``--mask_threshold``, apply to the stored maps and are recorded in metrics.json)."""
    recon = manifest.get("reconstruction") or {}
    features = manifest.get("feature_extractor") or {}
    data = manifest.get("data") or {}
    return {
        "mask_order": data.get("mask_order"),
        "classes": data.get("classes"),
        "use_captions": data.get("test_captions"),
        "sigma": manifest.get("sigma"),
        "map_dtype": manifest.get("map_dtype"),
        "precision": manifest.get("precision"),
        **{flag: recon.get(flag) for flag in ("ddim_steps", "noise_t", "guidance_scale", "seed")},
        "feature_extractor": features.get("name"),
        "feature_input_size": features.get("input_size"),
    }


def check_stored_settings(
    output_dir: Path, manifest: Mapping[str, Any], given: Mapping[str, Any], checkpoint: str | None = None
) -> None:
    """``--run_eval_only``: the flags the user gave (``given``: flag -> value, those that differ from
    test.py's defaults) agree with what the stored maps were made with (:func:`maps_settings`), and the
    checkpoint, if one is named, has the weights they were made from; else one :class:`UserError` naming
    the flag, the stored value and the fix."""
    from ldm.checkpoint import DIGEST_KEY, file_digest

    stored = maps_settings(manifest)
    for flag, value in given.items():
        if flag not in stored or stored[flag] is None and flag not in ("classes", "feature_input_size"):
            continue
        if _same_setting(value, stored[flag]):
            continue
        if flag == "classes":
            raise UserError(
                f"--classes {' '.join(value)}: the maps in {output_dir} are of "
                f"{'all classes' if stored[flag] is None else '--classes ' + ' '.join(stored[flag])} and "
                "--run_eval_only evaluates them all; give the --classes of the scoring run, or score the "
                "classes you want into another --output_dir"
            )
        raise UserError(
            f"--{flag} {value}: the maps in {output_dir} were made with --{flag} {stored[flag]}, and "
            f"--run_eval_only evaluates the stored maps as they are; drop --{flag} (or give {stored[flag]}), "
            f"or score again into another --output_dir"
        )
    was = (manifest.get("checkpoint") or {}).get(DIGEST_KEY)
    if checkpoint is not None and was is not None and not Path(checkpoint).is_file():
        log.warning("--resume_path %s: no such file; the stored maps are evaluated without it", checkpoint)
    elif checkpoint is not None and was is not None:
        now = file_digest(checkpoint)
        if now != was:
            raise UserError(
                f"--resume_path {checkpoint}: the maps in {output_dir} were made from other weights (sha256 "
                f"{was[:12]}... then, {now[:12]}... in this file); drop --resume_path to evaluate them, or "
                "score this checkpoint into another --output_dir"
            )


def _same_setting(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return sorted(map(str, a)) == sorted(map(str, b))
    return str(a) == str(b) if a is not None and b is not None else a == b


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
    checkpoint_digest: str,
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
        "checkpoint": checkpoint_record(checkpoint, checkpoint_digest),
        "config": config,
        "reconstruction": reconstruction,
        "feature_extractor": features,
        "data": data,
        "map_dtype": map_dtype,
        "sigma": sigma,
        "precision": precision,
    }
