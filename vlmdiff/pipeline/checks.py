"""Is a stage's output complete? Each check returns None when it is, else a short reason.

The checks read little: caption label files against the dataset index, checkpoint headers (not their
tensors), a test run's metrics.json and manifest. A stage whose check passes is skipped on a rerun.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from utils.errors import UserError
from vlmdiff.evaluation.run_folder import RunFolder


def checkpoint_done(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint file (torch zip with its data.pkl, or a safetensors header)."""
    path = Path(path)
    if not path.is_file():
        return f"{path} missing"
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                json.loads(f.read(n))
            return None
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("/data.pkl") for name in z.namelist()):
                return f"{path} is not a torch checkpoint (no data.pkl)"
    except (OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
        return f"{path} is unreadable or truncated ({type(e).__name__})"
    return None


def demo_done(data: Path, sd_path: Path) -> str | None:
    """The tiny recipe's demo data set (its marker says complete) and its stand-in base model."""
    marker = data / "demo_dataset.json"
    try:
        complete = marker.is_file() and json.loads(marker.read_text()).get("complete")
    except ValueError:
        complete = False
    if not complete:
        return f"{marker} missing or incomplete"
    return checkpoint_done(sd_path)


def vlm_token(vlm_model: str) -> str:
    """The captioner's file-name token of ``--vlm_model`` (its default backend)."""
    from vlmdiff.captioning import derive_vlm_name

    return derive_vlm_name(vlm_model, "template" if vlm_model == "template" else "auto")


def caption_folder(dataset: str, data_path: Path, vlm_model: str, prompt_type: str, folder: str | None) -> Path:
    """Where captioner.py writes (and train/test read) the caption files of a non-COCO data set."""
    from vlmdiff.data.captions import caption_folder_name

    if folder:
        return Path(folder)
    return Path(data_path).parent / caption_folder_name(dataset, vlm_token(vlm_model), prompt_type)


def captions_done(
    dataset: str, data_path: Path, vlm_model: str, prompt_type: str, folder: str | None, caption_model: str
) -> str | None:
    """None when the upstream caption files of both splits exist and name every image of the split."""
    from vlmdiff.captioning import plan_jobs, upstream_id
    from vlmdiff.data.captions import coco_caption_path, upstream_file_names

    if not Path(data_path).is_dir():
        return f"no data at {data_path}"
    if dataset == "coco":
        missing = [p for s in ("train", "test") if not (p := coco_caption_path(data_path, s, caption_model)).is_file()]
        return f"{missing[0]} missing" if missing else None
    out = caption_folder(dataset, data_path, vlm_model, prompt_type, folder)
    vlm = vlm_token(vlm_model)
    try:
        jobs = plan_jobs(dataset, Path(data_path), ("train", "test"))
    except UserError as e:
        return str(e)
    for split in ("train", "test"):
        captions, labels = (out / n for n in upstream_file_names(split, dataset, vlm))
        if not captions.is_file() or not labels.is_file():
            return f"{labels} missing"
        try:
            have = set(json.loads(labels.read_text()))
        except ValueError:
            return f"{labels} unreadable"
        want = {upstream_id(j.record, dataset) for j in jobs if j.split == split}
        if not want <= have:
            return f"{labels} lacks {len(want - have)} of the {len(want)} {split} images"
    return None


def test_done(results: Path, checkpoint: Path) -> str | None:
    """None when the test run has metrics of both protocols, made from ``checkpoint`` as it is now."""
    from ldm.checkpoint import DIGEST_KEY, file_digest

    metrics, manifest = RunFolder(results).metrics_json, RunFolder(results).manifest
    if not metrics.is_file() or not manifest.is_file():
        return f"{metrics} missing"
    try:
        have = json.loads(metrics.read_text()).get("metrics", {})
        made_from = json.loads(manifest.read_text()).get("checkpoint") or {}
    except ValueError:
        return f"{metrics} or {manifest} unreadable"
    if not {"legacy", "official"} <= set(have):
        return f"{metrics} lacks the legacy and official protocols"
    if not Path(checkpoint).is_file():
        return f"{checkpoint} missing"
    if made_from.get(DIGEST_KEY) != file_digest(checkpoint):  # the digest stored in the file: no weights read
        return f"{results} was made from other weights than those of {checkpoint}"
    return None


def report_done(run: Path, results: list[Path]) -> str | None:
    """None when paper_table.md is newer than every test run's metrics.json."""
    table = run / "paper_table.md"
    if not table.is_file():
        return f"{table} missing"
    jsons = [RunFolder(r).metrics_json for r in results]
    newest = max((os.stat(j).st_mtime for j in jsons if j.is_file()), default=0)
    return None if table.stat().st_mtime >= newest else f"{table} is older than the test results"
