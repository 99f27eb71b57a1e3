"""Scoring a test set: reconstruct each image, compare features, store its anomaly map (test.py's first half).

Images are scored in the order of the sorted test set; a shard is a slice of it, interleaved over
ranks (:func:`shard_indices`). Maps go to a :class:`vlmdiff.evaluation.map_store.MapStore` in chunks
named by the global index of their first image, so shards, ranks and restarts never collide, and a
resumed run skips images that already have a map.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from utils.errors import UserError
from utils.progress import DEFAULT_INTERVAL_S
from utils.progress import progress as progress_meter
from vlmdiff.evaluation.map_store import MapStore, SourceFiles
from vlmdiff.evaluation.run_inputs import check_sources
from vlmdiff.evaluation.visuals import write_strips, write_upstream_visuals
from vlmdiff.reconstruction import ReconstructionSettings, reconstruct
from vlmdiff.scoring import anomaly_map, image_score

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringOptions:
    """How :func:`score_images` runs: batching, device and precision, map smoothing and pooling, outputs.

    ``visuals`` gets our strips, ``upstream_visuals`` upstream's per-image files (both need the autoencoder
    pass). ``progress``: show it at all (a bar on a terminal when ``bar``, else a log line every
    ``log_interval`` s).
    """

    batch_size: int  # images per forward pass (test.py's default: vlmdiff.cli.BATCH_SIZE)
    num_workers: int = 0
    device: torch.device = torch.device("cpu")
    sigma: float = 5.0
    pooling: str = "paper"
    autocast_dtype: torch.dtype | None = None
    visuals: Path | None = None
    upstream_visuals: Path | None = None
    progress: bool = True
    bar: bool = True
    log_interval: float = DEFAULT_INTERVAL_S


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
    options: ScoringOptions,
    sources: Mapping[str, SourceFiles] | None = None,
) -> int:
    """Reconstruct, extract features, map and store the images ``indices`` of ``dataset`` not yet stored.

    ``sources``: :func:`source_files` of ``dataset.records``; the images already stored are checked
    against it before anything is scored (:func:`check_sources`), and each chunk records it.

    Returns the number of images scored now. Chunks are named by the global index of their first image.
    """
    batch_size, device, visuals, upstream_visuals = (
        options.batch_size,
        options.device,
        options.visuals,
        options.upstream_visuals,
    )
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
        num_workers=options.num_workers,
        pin_memory=device.type == "cuda",
    )
    firsts = todo[::batch_size]
    meter = progress_meter(
        len(todo),
        "test",
        "img",
        enabled=options.progress,
        bar=options.bar,
        interval_s=options.log_interval,
        logger=log,
    )
    for first, batch in zip(firsts, loader, strict=True):
        image = batch["image"].to(device)
        maps, rec = _maps(
            model,
            extractor,
            image,
            list(batch["caption"]),
            list(batch["filename"]),
            settings,
            options.sigma,
            options.autocast_dtype,
            decode_autoencoder=visuals is not None or upstream_visuals is not None,
        )
        scores = image_score(maps, options.pooling)
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
