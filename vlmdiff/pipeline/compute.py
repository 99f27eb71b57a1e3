"""GPU-hour estimates per stage, from FLOPs counted at SD-1.5 size on the meta device.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products and convolutions of one
training image (autoencoder encoder forward, SG network + controlled UNet forward and backward), one
test image (encode, the DDIM steps through SG network + UNet, one pass per step or two with caption
guidance, decode, feature extractor on input and reconstruction) and one autoencoder finetuning image
(encoder + decoder forward and backward). The model is built on the meta device (shapes only, nothing
materialised). Counting takes ~15 s, so the counts are cached in ``configs/recipes/flops.json``
(``python -m vlmdiff.pipeline.compute --update`` recounts them).

Hours = FLOPs x images / (sustained fraction x peak): these are estimates until ``bench/gpu.sh``
measures the real throughput. Not counted: the text encoder (~2% of a training step), LPIPS/VGG and
the discriminator in autoencoder finetuning, data loading, elementwise operations.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from utils.io import read_json, write_json
from vlmdiff.pipeline.recipe import RECIPES_DIR, Recipe

log = logging.getLogger(__name__)

FLOPS_FILE = RECIPES_DIR / "flops.json"
SUSTAINED = 0.40  # fraction of the peak a well-fed training/inference loop sustains (estimate)


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_bf16: float  # dense TFLOP/s
    peak_tf32: float  # dense TFLOP/s; the paper's fp32 runs as TF32 on tensor cores (cuDNN's default for convs)


GPUS = (Gpu("A100", 312.0, 156.0), Gpu("H100", 989.0, 494.0))
# Captioning with InternVL2-8B: prefill of ~3,400 tokens (12 tiles + thumbnail x 256 tokens + prompt) through
# 8e9 parameters; decoding (~100 tokens) is memory-bound and adds about a second per image on these GPUs.
VLM_PARAMS, VLM_TOKENS, VLM_DECODE_S = 8e9, 3400, 1.0


def count_flops(config: str = "sd15", features: str = "dino_v1s8", ddim_steps: int = 10) -> dict[str, float]:
    """FLOPs of one image per stage for model ``config`` (built on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlmdiff.config import load_model_config
    from vlmdiff.features import build_feature_extractor
    from vlmdiff.model import VLMDiff

    cfg = load_model_config(config)
    with torch.device("meta"):
        model = VLMDiff(cfg, load_pretrained_text=False).train()
        extractor = build_feature_extractor(features, random_init=True)
    size, ctx_dim = cfg.image_size, cfg.unet.context_dim
    length = 77
    x = torch.empty(1, 3, size, size, device="meta")
    context = torch.empty(1, length, ctx_dim, device="meta")
    t = torch.full((1,), 500, device="meta")

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    def train_step() -> None:
        with torch.no_grad():
            z = model.first_stage_model.encode(x).mean
        eps = model.apply_model(z, t, {"context": context, "hint": x})
        eps.float().pow(2).mean().backward()

    with torch.no_grad():
        z = model.first_stage_model.encode(x).mean
        encode = flops(lambda: model.first_stage_model.encode(x).mean)
        step = flops(lambda: model.apply_model(z, t, {"context": context, "hint": x}))
        decode = flops(lambda: model.decode_first_stage(z))
        feats = flops(lambda: extractor(x))

    def ae_step() -> None:
        ae = model.first_stage_model
        ae.requires_grad_(True)
        ae.decode(ae.encode(x).mean).pow(2).mean().backward()
        ae.requires_grad_(False)

    train = flops(train_step)
    ae = flops(ae_step)
    return {
        "train_image": train,
        "test_image_one_pass": encode + ddim_steps * step + decode + 2 * feats,
        "test_image_two_passes": encode + 2 * ddim_steps * step + decode + 2 * feats,
        "autoencoder_image": ae,
        "unet_sg_step": step,
        "features": feats,
    }


def cached_flops() -> dict[str, Any]:
    """The counts in configs/recipes/flops.json (SD-1.5 size, DINO ViT-S/8, 10 DDIM steps)."""
    return read_json(FLOPS_FILE)


def update_cache() -> dict[str, Any]:
    import time

    import torch

    start = time.perf_counter()
    counts = count_flops()
    data = {
        "what": "FLOPs of one image per stage at SD-1.5 size (sd15 preset, 256 px), DINO ViT-S/8 features, "
        "10 DDIM steps; torch.utils.flop_counter on the meta device",
        "torch": torch.__version__,
        "count_seconds": round(time.perf_counter() - start, 1),
        "flops": counts,
    }
    write_json(FLOPS_FILE, data)
    return data


@dataclass
class Estimate:
    stage: str
    part: int | None
    images: int
    tflop: float  # total
    hours: dict[str, float]  # GPU name -> GPU-hours at the stage's precision
    precision: str


def _hours(total_flops: float, precision: str) -> dict[str, float]:
    out = {}
    for gpu in GPUS:
        peak = gpu.peak_bf16 if precision.startswith(("bf16", "16")) else gpu.peak_tf32
        out[gpu.name] = total_flops / (SUSTAINED * peak * 1e12) / 3600
    return out


def estimate(recipe: Recipe) -> list[Estimate]:
    """GPU-hours per stage (and COCO-AD part) of a recipe at SD-1.5 size."""
    f = cached_flops()["flops"]
    data = recipe.data
    parts: list[int | None] = list(data.coco_parts) or [None]
    out: list[Estimate] = []
    total_images = recipe.captions.images or sum(data.train_images) + sum(data.test_images)
    vlm = (2 * VLM_PARAMS * VLM_TOKENS) * total_images
    cap_hours = {g: h + total_images * VLM_DECODE_S / 3600 for g, h in _hours(vlm, "bf16").items()}
    out.append(Estimate("captions", None, total_images, vlm / 1e12, cap_hours, "bf16"))
    for i, part in enumerate(parts):
        a = recipe.autoencoder
        if not a.checkpoint:
            n = a.max_steps * a.batch_size * a.accumulate_grad_batches
            total = f["autoencoder_image"] * n
            out.append(Estimate("autoencoder", part, n, total / 1e12, _hours(total, a.precision), a.precision))
        n = data.train_images[i] * recipe.train.epochs
        total = f["train_image"] * n
        p = recipe.train.precision
        out.append(Estimate("train", part, n, total / 1e12, _hours(total, p), p))
        n = data.test_images[i]
        per = f["test_image_two_passes" if recipe.test.use_captions else "test_image_one_pass"]
        p = recipe.test.precision
        out.append(Estimate("test", part, n, per * n / 1e12, _hours(per * n, p), p))
    return out


def format_estimates(recipe: Recipe, rows: list[Estimate]) -> str:
    """The plan's GPU-hour table (plain text)."""
    names = [g.name for g in GPUS]
    lines = [
        f"Estimated GPU-hours at SD-1.5 size (ESTIMATE: FLOPs counted on the meta device / {SUSTAINED:.0%} of peak; "
        "bench/gpu.sh measures the real throughput)",
        "peaks: "
        + "; ".join(f"{g.name} {g.peak_bf16:.0f} TFLOP/s bf16, {g.peak_tf32:.0f} TF32 (fp32 runs)" for g in GPUS),
        f"{'stage':<22}{'images':>12}{'PFLOP':>12}{'prec':>6}" + "".join(f"{n + ' h':>11}" for n in names),
    ]
    for r in rows:
        label = r.stage + (f" part{r.part}" if r.part is not None else "")
        lines.append(
            f"{label:<22}{r.images:>12,}{r.tflop / 1e3:>12.1f}{r.precision:>6}"
            + "".join(f"{r.hours[n]:>11.2f}" for n in names)
        )
    lines.append(
        f"{'total':<22}{'':>12}{sum(r.tflop for r in rows) / 1e3:>12.1f}{'':>6}"
        + "".join(f"{sum(r.hours[n] for r in rows):>11.2f}" for n in names)
    )
    if recipe.data.counts_note:
        lines.append(f"image counts: {recipe.data.counts_note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", action="store_true", help=f"recount the FLOPs and rewrite {FLOPS_FILE.name}")
    args = p.parse_args(argv)
    data = update_cache() if args.update else cached_flops()
    for k, v in data["flops"].items():
        print(f"{k:<24} {v / 1e12:10.3f} TFLOP")


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
