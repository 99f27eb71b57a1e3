"""Caption files: reading every format upstream and we write, and matching captions to images by id.

Formats:

- upstream pairs in a folder ``{dataset}_captions_{vlm}_{prompt_type}``:
  ``{split}_captions_{dataset}_{vlm}*.json`` (JSON list of strings) with its twin
  ``{split}_labels_{dataset}_{vlm}*.json`` (JSON list of image ids, same length); any shard suffix
  (``_0_500``, ...); all shards are merged;
- COCO caption format ``{root}/annotations/captions_{train|val}2017{suffix}.json``
  (``{"annotations": [{"image_id", "caption"}, ...]}``); the captions of one image are joined with
  a space in annotation order;
- our JSON-lines records ``{"id", "caption", "split", "dataset", "vlm", "prompt_type"}`` (the
  captioner's progress files, ``*.jsonl`` in the folder or its ``progress/`` sub-folder; read only
  when the folder has no upstream pair for the split).

Matching is by id, never by position: ids are compared after turning ``\\`` into ``/``; an id that
is not an image id as such is matched by its longest path suffix that is one, so absolute paths from
another machine (upstream's Real-IAD ids) match the root-relative ids of our index.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from utils.errors import UserError
from utils.io import read_json
from vlmdiff.data.common import Record

logger = logging.getLogger(__name__)

COCO_SPLIT_FOLDERS: tuple[tuple[str, str], ...] = (("train", "train2017"), ("test", "val2017"))


class CaptionMap(dict):
    """``dict[id, caption]`` that also remembers, for messages, which file each caption came from
    (``sources``), the file or folder it was read from (``origin``) and the split (``split``)."""

    def __init__(
        self,
        items: Mapping[str, str] | Iterable[tuple[str, str]] = (),
        sources: Mapping[str, str] | None = None,
        origin: str | None = None,
        split: str | None = None,
    ) -> None:
        super().__init__(items)
        self.sources: dict[str, str] = dict(sources or {})
        self.origin = origin
        self.split = split


def upstream_file_names(split: str, dataset: str, vlm: str) -> tuple[str, str]:
    """Upstream's names of the caption and label files of one split."""
    return f"{split}_captions_{dataset}_{vlm}.json", f"{split}_labels_{dataset}_{vlm}.json"


def caption_folder_name(dataset: str, vlm: str, prompt_type: str) -> str:
    """Upstream's caption folder name ``{dataset}_captions_{vlm}_{prompt_type}``."""
    return f"{dataset}_captions_{vlm}_{prompt_type}"


def coco_split_folder(split: str) -> str:
    """COCO image folder of a split: train -> train2017, test -> val2017."""
    return dict(COCO_SPLIT_FOLDERS)[split]


def coco_caption_path(root: str | os.PathLike, split: str, suffix: str) -> Path:
    """``{root}/annotations/captions_{train|val}2017{suffix}.json``."""
    return Path(root) / "annotations" / f"captions_{coco_split_folder(split)}{suffix}.json"


def normalize_id(raw: str) -> str:
    """Forward slashes, no leading ``./``; absolute paths stay absolute."""
    s = str(raw).replace("\\", "/")
    while s.startswith("./"):
        s = s[2:]
    return re.sub(r"/+", "/", s)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a partial last line (a crash mid-write) is ignored."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                logger.warning("%s: ignoring an incomplete last line (interrupted write)", path)
                continue
            raise UserError(f"{path} line {i + 1}: not valid JSON ({e}); remove or fix that line") from e
        if not isinstance(rec, dict) or "id" not in rec or "caption" not in rec:
            raise UserError(f"{path} line {i + 1}: expected a record with 'id' and 'caption'")
        out.append(rec)
    return out


def _add(out: dict[str, str], sources: dict[str, str], key: str, caption: str, source: str) -> None:
    key = normalize_id(key)
    if key in out and out[key] != caption:
        raise UserError(
            f"image id {key!r} has different captions in {sources[key]} and {source}; "
            "caption files of different models or prompts are mixed (pass the vlm/model name)"
        )
    out[key], sources[key] = caption, source


def _read_pair(captions_path: Path, labels_path: Path, out: dict[str, str], sources: dict[str, str]) -> None:
    if not labels_path.is_file():
        raise UserError(f"{captions_path} has no label file: expected {labels_path}")
    caps, ids = read_json(captions_path), read_json(labels_path)
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise UserError(f"{captions_path}: expected a JSON list of caption strings")
    if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
        raise UserError(f"{labels_path}: expected a JSON list of image ids")
    if len(caps) != len(ids):
        raise UserError(
            f"{captions_path} has {len(caps)} captions but {labels_path} has {len(ids)} ids; "
            "the two files of a pair must have the same length"
        )
    for key, cap in zip(ids, caps, strict=True):
        _add(out, sources, str(key), cap, str(captions_path))


def _read_coco(path: Path, split: str, out: dict[str, str], sources: dict[str, str]) -> None:
    doc = read_json(path)
    anns = doc.get("annotations") if isinstance(doc, dict) else None
    if not isinstance(anns, list):
        raise UserError(f'{path}: expected COCO caption format {{"annotations": [{{"image_id", "caption"}}]}}')
    m = re.search(r"captions_(train|val)2017", path.name)
    folder = f"{m.group(1)}2017" if m else coco_split_folder(split)
    names = {
        img["id"]: os.path.basename(img["file_name"])
        for img in doc.get("images") or []
        if isinstance(img, dict) and "id" in img and "file_name" in img
    }
    joined: dict[str, list[str]] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise UserError(f"{path}: annotations[{i}] lacks image_id or a caption string")
        iid = ann["image_id"]
        name = names.get(iid) or (f"{int(iid):012d}.jpg" if str(iid).isdigit() else str(iid))
        joined.setdefault(f"{folder}/{name}", []).append(ann["caption"].strip())
    for key, caps in joined.items():
        _add(out, sources, key, " ".join(caps), str(path))


def _read_jsonl_files(
    paths: Sequence[Path], split: str, dataset: str, vlm: str | None, out: dict[str, str], sources: dict[str, str]
) -> None:
    for path in paths:
        for rec in read_jsonl(path):
            if rec.get("split", split) != split:
                continue
            if rec.get("dataset", dataset) != dataset:
                raise UserError(f"{path} holds captions of dataset {rec.get('dataset')!r}, not {dataset!r}")
            if vlm is not None and rec.get("vlm", vlm) != vlm:
                continue
            _add(out, sources, str(rec["id"]), str(rec["caption"]), str(path))


def _coco_files(folder: Path, split: str, caption_model: str | None) -> list[Path]:
    bases = [folder / "annotations", folder]
    stem = f"captions_{coco_split_folder(split)}"
    if caption_model is not None:
        suffix = caption_model if caption_model == "" or caption_model.startswith("_") else f"_{caption_model}"
        tried = [b / f"{stem}{suffix}.json" for b in bases]
        found = [p for p in tried if p.is_file()]
        if not found:
            raise UserError(
                f"COCO caption file not found: looked for {' and '.join(map(str, tried))} "
                f"(--caption_model {caption_model!r})"
            )
        return found[:1]
    found = sorted({p for b in bases if b.is_dir() for p in b.glob(f"{stem}*.json")})
    if len(found) > 1:
        raise UserError(
            f"several COCO caption files for {split} in {folder}: {', '.join(p.name for p in found)}; "
            "pick one with --caption_model (the suffix, e.g. _internvl)"
        )
    return found


def load_captions(
    path: str | os.PathLike, split: str, dataset: str, *, vlm: str | None = None, caption_model: str | None = None
) -> CaptionMap:
    """Read the ``split`` captions of ``dataset`` from a caption file or folder: ``{id: caption}``.

    ``vlm`` restricts a folder to files/records of that model token; ``caption_model`` is the COCO
    caption-file suffix. Duplicate ids with different captions are an error.
    """
    from vlmdiff.data.registry import canonical_name

    dataset = canonical_name(dataset)
    path = Path(path)
    out: dict[str, str] = {}
    sources: dict[str, str] = {}
    if path.is_file():
        if path.suffix == ".jsonl":
            _read_jsonl_files([path], split, dataset, vlm, out, sources)
        elif "_labels_" in path.name:
            _read_pair(path.with_name(path.name.replace("_labels_", "_captions_", 1)), path, out, sources)
        elif "_captions_" in path.name:
            _read_pair(path, path.with_name(path.name.replace("_captions_", "_labels_", 1)), out, sources)
        else:
            _read_coco(path, split, out, sources)
    elif path.is_dir():
        coco = _coco_files(path, split, caption_model) if dataset == "coco" else []
        prefix = f"{split}_captions_{dataset}_{vlm}" if vlm else f"{split}_captions_{dataset}_"
        pairs = sorted(p for p in path.glob(f"{prefix}*.json"))
        if coco:
            for p in coco:
                _read_coco(p, split, out, sources)
        elif pairs:
            for p in pairs:
                _read_pair(p, p.with_name(p.name.replace("_captions_", "_labels_", 1)), out, sources)
        else:
            jsonl = sorted(path.glob("*.jsonl")) + sorted((path / "progress").glob("*.jsonl"))
            _read_jsonl_files(jsonl, split, dataset, vlm, out, sources)
            if not out:
                raise UserError(_nothing_found(path, split, dataset, vlm, prefix, jsonl))
    else:
        raise UserError(f"caption file or folder {path} not found")
    logger.info("read %d %s captions for %s from %s", len(out), split, dataset, path)
    return CaptionMap(out, sources, origin=str(path), split=split)


def _nothing_found(path: Path, split: str, dataset: str, vlm: str | None, prefix: str, jsonl: list[Path]) -> str:
    """The error of a caption folder without captions of ``split``: what was looked for, and what is there."""
    tried = [path / f"{prefix}*.json"] + (
        [path / "*.jsonl", path / "progress" / "*.jsonl"] + ([] if vlm is None else [f"(records of --vlm_model {vlm})"])
    )
    if dataset == "coco":
        tried += [b / f"captions_{coco_split_folder(split)}*.json" for b in (path / "annotations", path)]
    present = sorted(p.name for p in path.glob("*_captions_*.json"))
    mine = f"{split}_captions_{dataset}_"  # upstream's name: {split}_captions_{dataset}_{vlm}.json
    made_by = sorted(p[len(mine) : -len(".json")] for p in present if p.startswith(mine) and p.endswith(".json"))
    there = (
        f"; the folder holds {', '.join(present)}"
        + (f" (made with --vlm_model {' or '.join(made_by)}? give that flag)" if made_by and vlm not in made_by else "")
        if present
        else f"; the folder holds no caption file{f' ({len(jsonl)} progress file(s) without them)' if jsonl else ''}"
    )
    return (
        f"no {split} captions for {dataset} in {path}: looked for {', '.join(map(str, tried))}{there} "
        f"(upstream's {prefix}*.json needs its {split}_labels_{dataset}_* twin)"
    )


def _suffix_match(key: str, ids: set[str]) -> str | None:
    if key in ids:
        return key
    parts = key.split("/")
    for i in range(1, len(parts)):
        cand = "/".join(parts[i:])
        if cand in ids:
            return cand
    return None


def _exists_under(root: Path, key: str, top: set[str]) -> bool:
    """Whether ``key`` names an existing file below ``root`` (some suffix of it, starting at a top-level name)."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part in top and (root.joinpath(*parts[i:])).is_file():
            return True
    return False


def match_captions(
    records_or_ids: Sequence[Record] | Sequence[str],
    captions: Mapping[str, str],
    *,
    root: str | os.PathLike | None = None,
    require: bool = False,
) -> dict[str, str]:
    """Captions of the given images, keyed by image id.

    A caption id that matches none of the images is an error unless it names an existing file below
    ``root`` (an image of another class or split); if no caption matches at all, the file is for
    another dataset or split (an error). Images without a caption, or whose caption is empty or only
    white space, are reported (count + examples) and get the empty caption; with ``require`` they are
    an error, and so is a caption source that holds no caption at all. Messages name the split and the
    caption file or folder when ``captions`` is a :class:`CaptionMap` from :func:`load_captions`.
    """
    ids = [r.id if isinstance(r, Record) else str(r) for r in records_or_ids]
    id_set = set(ids)
    sources = getattr(captions, "sources", {})
    split = getattr(captions, "split", None)
    origin = getattr(captions, "origin", None)
    images = f"{split} images" if split else "images"
    where = f" in {origin}" if origin else ""
    fix = f" (caption them with captioner.py{f' --split {split}' if split else ''}, or run without --use_captions)"
    if require and ids and not captions:
        raise UserError(
            f"{origin or 'the given captions'}: no {split + ' ' if split else ''}captions in it, but "
            f"--use_captions needs one for each of the {len(ids)} {images}" + fix
        )
    matched: dict[str, str] = {}
    matched_from: dict[str, str] = {}
    root_path = Path(root) if root is not None else None
    top = {p.name for p in root_path.iterdir()} if root_path is not None and root_path.is_dir() else set()
    for key, cap in captions.items():
        norm = normalize_id(key)
        hit = _suffix_match(norm, id_set)
        src = sources.get(key, "the given captions")
        if hit is None:
            if root_path is None or not _exists_under(root_path, norm, top):
                below = f" below {root_path}" if root_path is not None else ""
                example = f"; image ids look like {ids[0]!r}" if ids else ""
                raise UserError(
                    f"{src}: caption id {key!r} matches no image{below}{example}; "
                    "is this caption file for another dataset or root?"
                )
            continue
        if hit in matched and matched[hit] != cap:
            raise UserError(
                f"image {hit!r} matches two different caption ids ({matched_from[hit]!r} and {key!r}) in {src}"
            )
        matched[hit], matched_from[hit] = cap, key
    if captions and ids and not matched:
        example = next(iter(captions))
        raise UserError(
            f"none of the {len(captions)} captions in {sorted(set(sources.values())) or 'the given captions'} "
            f"matches an image of this split (caption id {example!r}, image id {ids[0]!r}); "
            "a caption file of another split or dataset?"
        )
    missing = [i for i in ids if i not in matched]
    blank = [i for i in ids if i in matched and not matched[i].strip()]
    for bad, what in ((missing, "have no caption"), (blank, "have an empty caption")):
        if not bad:
            continue
        msg = f"{len(bad)} of {len(ids)} {images} {what}{where}, e.g. {', '.join(bad[:3])}"
        if require:
            raise UserError(msg + fix)
        logger.warning("%s; they get the empty caption", msg)
    return {i: cap for i, cap in matched.items() if cap.strip()}
