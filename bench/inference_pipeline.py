"""The test-time pipeline as bench_inference.py runs it: the ways (variants) of running it, and its parts.

A :class:`Variant` fixes batch size, guidance passes, attention, visual decode, memory format,
precision and compilation; :func:`run_variant` turns images into anomaly maps and image scores with
the library's own reconstruction and scoring; :func:`component_profile` times each part of one
reconstruction and counts its FLOPs.

The scripts put the repository root on ``sys.path`` themselves and import this as
``bench.inference_pipeline``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vlmdiff.config import VLMDiffConfig
from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from vlmdiff.features import FeatureExtractor
from vlmdiff.model import VLMDiff
from vlmdiff.reconstruction import ReconstructionSettings, reconstruct
from vlmdiff.scoring import anomaly_map, image_score
from vlmdiff.sg_network import zero_initialised_modules


@dataclass(frozen=True)
class Variant:
    """One way of running the test-time pipeline."""

    name: str
    batch: int  # images per call
    two_passes: bool  # guidance as [uncond; cond] even when they are equal
    attention: str  # "math" (explicit softmax(QK^T)V) or "sdpa"
    decode_autoencoder: bool  # decode z for the visuals too
    channels_last: bool = False
    bf16: bool = False  # autocast (CUDA only)
    compile: bool = False


def variants(batch: int, cuda: bool, channels_last: bool, compile_: bool, ablation: bool) -> list[Variant]:
    """Upstream's way, the ablation steps (optional), ours, and ours with the opt-in extras.

    Ours is test.py's path with the settings recommended per device: on CUDA bf16 autocast
    (``--precision bf16``) and channels_last; on a CPU float32 and NCHW, which keep every image's map
    bit-identical whatever the batch size (channels_last on a CPU does not: ``channels_last`` adds
    it as an extra row).
    """
    up = Variant("upstream way", 1, True, "math", True)
    a = dataclasses.replace(up, name="+ one pass (cond == uncond)", two_passes=False)
    b = dataclasses.replace(a, name="+ SDPA attention", attention="sdpa")
    c = dataclasses.replace(b, name="+ no visual-only decode", decode_autoencoder=False)
    d = dataclasses.replace(c, name=f"+ batch {batch}", batch=batch)
    e = dataclasses.replace(d, name="+ channels_last", channels_last=True)
    ours = dataclasses.replace(e if cuda else d, name="ours", bf16=cuda)
    steps = [a, b, c, d, e] if cuda else [a, b, c]
    out = [up, *(steps if ablation else []), ours]
    if channels_last and not cuda:
        out.append(dataclasses.replace(ours, name="ours + channels_last", channels_last=True))
    if compile_:
        out.append(dataclasses.replace(out[-1], name=out[-1].name + " + torch.compile", compile=True))
    return out


def build_model(cfg: VLMDiffConfig, device: torch.device) -> VLMDiff:
    """A random-weight VLMDiff whose SG network's zero-initialised layers are small random ones."""
    torch.manual_seed(0)
    model = VLMDiff(cfg, load_pretrained_text=False).eval()
    with torch.no_grad():
        for conv in zero_initialised_modules(model.control_model):
            conv.reset_parameters()
            conv.weight.mul_(0.1)
    return model.to(device)


def model_for(base: VLMDiff, variant: Variant) -> VLMDiff:
    """``base`` itself, or a model sharing its weights with the variant's attention / memory format / compile."""
    if variant.attention == base.cfg.unet.attention and not variant.channels_last and not variant.compile:
        return base
    cfg = dataclasses.replace(base.cfg, unet=dataclasses.replace(base.cfg.unet, attention=variant.attention))
    with torch.device("meta"):
        model = VLMDiff(cfg, load_pretrained_text=False, text_encoder=base.cond_stage_model)
    model.load_state_dict(base.state_dict(), assign=True)  # the same tensors, no copy
    model.eval().requires_grad_(False)
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)  # new tensors for this model's conv weights only
    if variant.compile:
        for module in (
            model.control_model,
            model.model.diffusion_model,
            model.first_stage_model.encoder,
            model.first_stage_model.decoder,
        ):
            module.compile()
    return model


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random RGB images (n, 3, size, size), ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    rgb = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


def run_variant(
    model: VLMDiff,
    extractor: FeatureExtractor,
    images: torch.Tensor,
    variant: Variant,
    settings: ReconstructionSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (N, H, W) and image scores (N,) of all ``images``, ``variant.batch`` at a time."""
    device = next(model.parameters()).device
    maps, scores = [], []
    for a in range(0, len(images), variant.batch):
        x = images[a : a + variant.batch].to(device)  # (b, 3, H, W)
        if variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ids = [f"img{a + i:05d}" for i in range(len(x))]
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            rec = reconstruct(
                model,
                x,
                [""] * len(x),
                ids,
                settings,
                decode_autoencoder=variant.decode_autoencoder,
                two_passes=variant.two_passes,
            )
            f_in, f_rec = extractor(x), extractor(rec["sample"].to(x.dtype))
        m = anomaly_map([f.float() for f in f_in], [f.float() for f in f_rec], out_size=tuple(x.shape[-2:]))
        maps.append(m.cpu())
        scores.append(image_score(m).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(maps), torch.cat(scores)


def component_profile(
    model: VLMDiff, extractor: FeatureExtractor, batch: int, device: torch.device, steps: int, repeats: int
) -> list[dict[str, Any]]:
    """Milliseconds per image and GFLOP per image of each part of one reconstruction (ours, fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    x = synthetic_images(batch, cfg.image_size).to(device)
    with torch.inference_mode():
        ctx = model.get_learned_conditioning([""]).expand(batch, -1, -1)
        z = model.encode_first_stage(x)
        t = torch.full((batch,), 901, device=device)
        hint = model.control_model.embed_hint(x)
        unet = model.model.diffusion_model
        emb = unet.embed_time(t)
        h, hs = unet.encode(z, emb, ctx)
        skip = model.unused_controls()  # as apply_model runs it
        control = model.control_model(z, x, t, ctx, hint, skip=skip)
    parts: list[tuple[str, int, Callable[[], Any]]] = [
        ("autoencoder encode", 1, lambda: model.encode_first_stage(x)),
        ("SG hint block (once per run)", 1, lambda: model.control_model.embed_hint(x)),
        ("SG network without hint block", steps, lambda: model.control_model(z, x, t, ctx, hint, skip=skip)),
        ("UNet encoder half (frozen)", steps, lambda: unet.encode(z, emb, ctx)),
        ("UNet decoder half", steps, lambda: unet.decode(h + control[-1], hs, emb, ctx)),
        ("autoencoder decode", 1, lambda: model.decode_first_stage(z)),
        ("features (input + reconstruction)", 2, lambda: extractor(x)),
    ]
    rows = []
    with torch.inference_mode():
        for name, calls, fn in parts:
            with FlopCounterMode(display=False) as counter:
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "part": name,
                    "calls_per_image": calls,
                    "ms_per_image_per_call": 1000 * min(times) / batch,
                    "gflop_per_image_per_call": counter.get_total_flops() / 1e9 / batch,
                }
            )
    return rows
