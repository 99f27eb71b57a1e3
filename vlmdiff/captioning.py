"""Stage 1: caption every image of a dataset with a vision-language model.

Pieces: the prompts; the ``template`` backend (offline descriptions from the class name and image
statistics; the VLM backends are in ``vlmdiff.vlm_backends``); a crash-safe JSON-lines progress file per
shard; and the merge into upstream's file formats.

Progress files live in ``{output}/progress/{dataset}_{vlm}_{prompt_type}_{start}-{end}.jsonl``
(not named like upstream's files, so upstream's prefix lookup never picks them up). Every record is
flushed and fsynced; a partial last line left by a crash is cut off before appending. Images whose
(split, id) appear in any progress file of the folder are skipped, so a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from utils.errors import UserError
from utils.io import write_json
from utils.progress import DEFAULT_INTERVAL_S, progress
from vlmdiff.data.captions import coco_caption_path, read_jsonl, upstream_file_names
from vlmdiff.data.common import Record, load_rgb

logger = logging.getLogger(__name__)

PROMPTS: Mapping[str, str] = MappingProxyType(
    {
        "pd": "Describe the visual features of image in detail with a focus on the main object, with around 60 words "
        "and maybe 4 or 5 sentences.",
        "pa": "Be a pixel level visual defect inspector, and describe whether there is a defect or not on the main "
        "object itself, with around 60 words and maybe 4 or 5 sentences.",
        "coco": "Describe the visual features of image in detail, with around 60 words and maybe 4 or 5 sentences.",
    }
)


@dataclass(frozen=True)
class Job:
    """One image to caption."""

    split: str
    record: Record


def prompt_for(dataset: str, prompt_type: str) -> str:
    """The exact upstream prompt; COCO always uses its own prompt."""
    if prompt_type not in ("pd", "pa"):
        raise UserError(f"unknown --prompt_type {prompt_type!r}; valid: pd, pa")
    return PROMPTS["coco"] if dataset == "coco" else PROMPTS[prompt_type]


def derive_vlm_name(model: str, backend: str) -> str:
    """File-name token of the model actually used: internvl / blip / deepseekvl / llava for the paper's
    captioners (short name, hub id, or a folder named like the hub id), else the sanitised model name."""
    from vlmdiff.vlm_backends import known_vlm

    if backend == "template":
        return "template"
    vlm = known_vlm(model)
    if vlm is not None:
        return vlm.name
    token = re.sub(r"[^a-z0-9]", "", Path(model.lower().rstrip("/")).name)
    if not token:
        raise UserError(f"cannot derive a file-name token from --vlm_model {model!r}; pass --vlm_name")
    return token


def check_vlm_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", name):
        raise UserError(f"--vlm_name {name!r} must be letters and digits only (it is part of file names split at '_')")
    return name


def plan_jobs(dataset: str, root: Path, splits: Sequence[str], coco_part: int | None = None) -> list[Job]:
    """Images to caption: per split (in the given order) the dataset index sorted by id.

    COCO-AD: the images of meta part ``coco_part``, or of every ``meta_20_*.json`` present when it is
    None or -1 (caption files are per COCO split, shared by the four parts).
    """
    from vlmdiff.data.coco import PARTS, index_coco, meta_path
    from vlmdiff.data.registry import index_dataset

    jobs: list[Job] = []
    for split in splits:
        if dataset == "coco" and (coco_part is None or coco_part < 0):
            parts = [p for p in PARTS if meta_path(root, p).is_file()]
            if not parts:
                raise UserError(
                    f"no COCO-AD meta files in {root}: expected {meta_path(root, 0)} ... "
                    f"{meta_path(root, 3)} (make them with utils/prepare_coco_ad.py)"
                )
            records = {r.id: r for p in parts for r in index_coco(root, split, p)}.values()
        else:
            records = index_dataset(dataset, root, split, coco_part=coco_part)
        jobs += [Job(split, r) for r in sorted(records, key=lambda r: r.id)]
    return jobs


def shard(jobs: Sequence[Job], start: int, end: int | None) -> list[Job]:
    """``jobs[start:end]`` (end exclusive, None = to the end) with the bounds checked."""
    if start < 0 or (end is not None and end < 0):
        raise UserError(f"--start_ind {start} and --end_ind {end} must be >= 0")
    if end is not None and start > end:
        raise UserError(f"--start_ind {start} is greater than --end_ind {end}")
    return list(jobs[start:end])


# ---------------------------------------------------------------- template descriptions

_HUES: tuple[tuple[float, str], ...] = (
    (15, "red"),
    (40, "orange"),
    (70, "yellow"),
    (160, "green"),
    (200, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (335, "pink"),
    (360, "red"),
)


def _colour_name(rgb: np.ndarray) -> str:
    """Name of the dominant colour of (N, 3) uint8 pixels: hue histogram weighted by saturation."""
    x = rgb.astype(np.float64) / 255.0
    mx, mn = x.max(1), x.min(1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-8), 0.0)
    if sat.mean() < 0.15:
        v = mx.mean()
        return "black" if v < 0.2 else "dark gray" if v < 0.45 else "light gray" if v < 0.8 else "white"
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    d = np.maximum(mx - mn, 1e-8)
    hue = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    hist, edges = np.histogram(hue, bins=36, range=(0, 360), weights=sat)
    peak = (edges[int(hist.argmax())] + 5.0) % 360
    name = next(n for bound, n in _HUES if peak < bound)
    return ("dark " if mx.mean() < 0.35 else "") + name


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def describe_image(img: np.ndarray, class_name: str, prompt_type: str) -> str:
    """A 40-60 word description of an image (uint8 HxW or HxWx3) from simple statistics."""
    rgb = np.asarray(Image.fromarray(img).convert("RGB").resize((96, 96), Image.BILINEAR))
    lum = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(lum)
    edges = float((np.hypot(gx, gy) > 12).mean())
    obj = class_name.replace("_", " ")
    thing = "scene" if class_name == "coco" else obj
    bright = "dark" if lum.mean() < 70 else "evenly lit" if lum.mean() < 160 else "bright"
    contrast = "low" if lum.std() < 25 else "moderate" if lum.std() < 55 else "high"
    texture = "smooth" if edges < 0.08 else "finely textured" if edges < 0.25 else "strongly textured"
    ratio = float(np.abs(gx).mean() / max(np.abs(gy).mean(), 1e-8))
    lines = "mostly vertical" if ratio > 1.3 else "mostly horizontal" if ratio < 1 / 1.3 else "mixed"
    centre, border = lum[24:72, 24:72].mean(), np.concatenate([lum[:12].ravel(), lum[-12:].ravel()]).mean()
    rel = "brighter than" if centre > border + 15 else "darker than" if centre < border - 15 else "similar to"
    blocks = lum.reshape(6, 16, 6, 16).mean((1, 3))
    odd = float(np.abs(blocks - np.median(blocks)).max() / (lum.std() + 1e-8))
    sentences = [
        f"The image shows {_a(thing)} with a mainly {_colour_name(rgb[24:72, 24:72].reshape(-1, 3))} centre "
        f"on {_a(_colour_name(rgb.reshape(-1, 3)))} overall palette.",
        f"The view is {bright} with {contrast} contrast.",
        f"The surface looks {texture}, with {lines} edges and structures.",
        f"The central region is {rel} the surrounding border.",
    ]
    if prompt_type == "pa":
        sentences.append(
            "One area stands out from the rest of the surface and may be a defect."
            if odd > 1.5
            else "No area stands out, so the main object appears free of defects."
        )
    else:
        sentences.append(f"Overall the {thing} appears consistent and typical in shape and colour.")
    return " ".join(sentences)


# ---------------------------------------------------------------- backends


class TemplateBackend:
    """Offline, deterministic descriptions from the class name and simple image statistics."""

    def __init__(self, prompt_type: str) -> None:
        self.prompt_type = prompt_type

    def __call__(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[str]:
        return [describe_image(np.asarray(im), c, self.prompt_type) for im, c in zip(images, class_names, strict=True)]


# ---------------------------------------------------------------- progress files


def progress_dir(output: Path) -> Path:
    return output / "progress"


def progress_file(
    output: Path, dataset: str, vlm: str, prompt_type: str, start: int, end: int | None, rank: int = 0, world: int = 1
) -> Path:
    """The JSON-lines progress file of one shard (and one rank of it, under a distributed launcher)."""
    ranked = f"_rank{rank}of{world}" if world > 1 else ""
    return progress_dir(output) / f"{dataset}_{vlm}_{prompt_type}_{start}-{'end' if end is None else end}{ranked}.jsonl"


def read_progress(output: Path, dataset: str, vlm: str, prompt_type: str) -> dict[tuple[str, str], str]:
    """All captions in the folder's progress files: {(split, id): caption}; another run's records are an error."""
    done: dict[tuple[str, str], str] = {}
    folder = progress_dir(output)
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for rec in read_jsonl(path):
            mine = (rec.get("dataset"), rec.get("vlm"), rec.get("prompt_type"))
            if mine != (dataset, vlm, prompt_type):
                raise UserError(
                    f"{path} holds captions of another run (dataset/vlm/prompt_type {mine}, this run "
                    f"{(dataset, vlm, prompt_type)}); choose another --output folder"
                )
            if rec.get("split") not in ("train", "test"):
                raise UserError(f"{path}: record {rec['id']!r} has no valid 'split' (train/test)")
            done[(rec["split"], rec["id"])] = rec["caption"]
    return done


class ProgressWriter:
    """Append-only JSON-lines writer: one fsynced line per caption; a torn last line is cut off first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "ab+")
        except OSError as e:
            raise UserError(f"cannot open {path} for writing: {e.strerror or e}") from e
        size = self._f.seek(0, os.SEEK_END)
        if size:
            self._f.seek(size - 1)
            if self._f.read(1) != b"\n":
                self._f.truncate(self._last_line_end(size))
                logger.warning("%s: removed an incomplete last line left by an interrupted run", path)

    def _last_line_end(self, size: int) -> int:
        """Offset just after the last newline (0 if none), scanning backwards in chunks."""
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            self._f.seek(pos)
            k = self._f.read(step).rfind(b"\n")
            if k >= 0:
                return pos + k + 1
        return 0

    def write(self, record: dict) -> None:
        try:
            self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise UserError(
                f"could not write {self.path}: {e.strerror or e} (check free disk space); "
                "rerun the same command to resume"
            ) from e

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------- run and merge


def caption_jobs(
    jobs: Sequence[Job],
    backend: Callable[[Sequence[Image.Image], Sequence[str]], list[str]],
    writer: ProgressWriter,
    meta: Mapping[str, str],
    batch_size: int = 1,
    delay: float = 0.0,
    bar: bool = True,
    log_interval: float = DEFAULT_INTERVAL_S,
) -> int:
    """Caption ``jobs`` in batches, appending one record per image; returns how many were written.

    Progress: a bar on a terminal (when ``bar``), else a log line every ``log_interval`` seconds.
    """
    n = 0
    with progress(len(jobs), "captioning", "img", bar=bar, interval_s=log_interval, logger=logger) as meter:
        for i in range(0, len(jobs), max(1, batch_size)):
            batch = jobs[i : i + max(1, batch_size)]
            images = [load_rgb(j.record.image_path) for j in batch]
            captions = backend(images, [j.record.class_name for j in batch])
            for job, cap in zip(batch, captions, strict=True):
                if delay:
                    time.sleep(delay)
                writer.write({"id": job.record.id, "caption": cap, "split": job.split, **meta})
                n += 1
                meter.update(1)
    return n


def upstream_id(record: Record, dataset: str) -> str:
    """Upstream's image id: absolute path for Real-IAD, the root-relative id otherwise."""
    return os.path.abspath(record.image_path) if dataset == "realiad" else record.id


def merge_split(
    output: Path,
    root: Path,
    dataset: str,
    vlm: str,
    split: str,
    jobs: Sequence[Job],
    done: Mapping[tuple[str, str], str],
    strict: bool,
) -> bool:
    """Write the upstream-format files of ``split`` if every image of ``jobs`` has a caption.

    Returns whether the files were written; with ``strict`` a missing caption is a UserError.
    """
    mine = [j for j in jobs if j.split == split]
    missing = [j.record.id for j in mine if (split, j.record.id) not in done]
    if missing:
        msg = (
            f"{len(missing)} of {len(mine)} {split} images have no caption yet, e.g. {missing[0]}; "
            "run the remaining --start_ind/--end_ind shards first"
        )
        if strict:
            raise UserError(msg)
        logger.info("%s; then merge with --merge", msg)
        return False
    if dataset == "coco":
        ids = sorted(i for (s, i) in done if s == split)
        bad = [i for i in ids if not Path(i).stem.isdigit()]
        if bad:
            raise UserError(f"COCO image {bad[0]} has no numeric COCO image id in its file name")
        images = [{"id": int(Path(i).stem), "file_name": Path(i).name} for i in ids]
        anns = [{"id": k + 1, "image_id": int(Path(i).stem), "caption": done[(split, i)]} for k, i in enumerate(ids)]
        path = coco_caption_path(root, split, f"_{vlm}")
        write_json(path, {"images": images, "annotations": anns})
        logger.info("wrote %s (%d captions)", path, len(anns))
        return True
    ordered = sorted(mine, key=lambda j: j.record.id)
    cap_name, lab_name = upstream_file_names(split, dataset, vlm)
    write_json(output / lab_name, [upstream_id(j.record, dataset) for j in ordered])
    write_json(output / cap_name, [done[(split, j.record.id)] for j in ordered])
    logger.info("wrote %s and %s (%d captions)", output / cap_name, output / lab_name, len(ordered))
    return True
