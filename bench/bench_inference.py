"""Test-time throughput and peak memory: upstream's way vs ours (reconstruction + features + scoring).

Both ways run the same code (vlmdiff.reconstruction, vlmdiff.scoring) on the same random-weight
model and the same synthetic images, and produce anomaly maps and image scores:

* upstream's way: one image per call, classifier-free guidance always as two passes (the batch
  [uncond; cond], even though the empty caption makes them equal), attention as an explicit
  softmax(QK^T)V, float32, and the plain autoencoder reconstruction decoded too (upstream always
  decodes it for its visuals);
* ours: batches (by default of test.py's --batch_size, 8), one pass when cond == uncond, SDPA
  attention, no visual-only decode; on CUDA also channels_last and bf16 autocast; opt-in rows:
  ``--channels_last`` on a CPU, ``--compile``.

Always on in both (bit-identical or rounding-level changes in the library): the SG hint block runs
once per sampling run instead of once per step, the zero convolutions of the controls the UNet never
reads are skipped, and a context shared by the whole batch has its keys/values computed for one row,
which all the batch's queries attend to in one call (only ours has such a context: upstream's two
passes concatenate theirs). ``--ablation`` adds the intermediate steps, each measured.
Variants run in turn, ``--repeats`` times (interleaved, so load changes hit all of them); the
best time counts. The maps of every variant are compared with upstream's way.

Weights are random (``torch.manual_seed(0)``); the SG network's zero-initialised layers get a
small random initialisation so that its controls matter. Feature extractor: ResNet-50 layers 1-3
(the default), random weights.

    python bench/bench_inference.py --config mid --images 8 --batch 4
    python bench/bench_inference.py --config tiny --ablation                  # ours at test.py's batch size, 8
    python bench/bench_inference.py --config tiny --batch 4                   # ours at batch 4
    python bench/bench_inference.py --config sd15 --device cuda --images 16 --batch 8 --compile
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import MemoryMeter, load_average, table, write_results  # noqa: E402
from vlmdiff.cli import BATCH_SIZE  # noqa: E402
from vlmdiff.config import VLMDiffConfig, load_model_config  # noqa: E402
from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from vlmdiff.features import FeatureExtractor, build_feature_extractor  # noqa: E402
from vlmdiff.model import VLMDiff  # noqa: E402
from vlmdiff.reconstruction import ReconstructionSettings, reconstruct  # noqa: E402
from vlmdiff.scoring import anomaly_map, image_score  # noqa: E402
from vlmdiff.sg_network import zero_initialised_modules  # noqa: E402

# Largest |map difference| to upstream's way accepted, per compute precision (maps lie in [0, 6]).
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", help="model preset: tiny, mid, sd15")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=8, help="images per timed run (a multiple of --batch)")
    p.add_argument(
        "--batch",
        type=int,
        default=BATCH_SIZE,
        help="our batch size (default: test.py's --batch_size default, which ours stands for)",
    )
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time counts")
    p.add_argument("--ddim_steps", type=int, default=10)
    p.add_argument(
        "--channels_last",
        action="store_true",
        help="on a CPU, also time ours in channels_last memory format (on CUDA ours always is)",
    )
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    p.add_argument("--ablation", action="store_true", help="also time each step from upstream's way to ours")
    p.add_argument("--profile", action="store_true", help="also time each part of the pipeline (ms, GFLOP)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/inference_{config}.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.images % args.batch:
        raise SystemExit(f"--images {args.images} must be a multiple of --batch {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = load_model_config(args.config)
    settings = ReconstructionSettings(ddim_steps=args.ddim_steps)
    base = build_model(cfg, device)
    extractor = build_feature_extractor("resnet50", random_init=True).to(device)
    n_params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (
            ("unet", base.model),
            ("sg_network", base.control_model),
            ("autoencoder", base.first_stage_model),
            ("text_encoder", base.cond_stage_model),
            ("features", extractor),
        )
    }
    images = synthetic_images(args.images, cfg.image_size)
    todo = variants(args.batch, cuda, args.channels_last, args.compile, args.ablation)
    models = {v.name: model_for(base, v) for v in todo}
    extractors = {False: extractor, True: copy.deepcopy(extractor).to(memory_format=torch.channels_last)}
    meter = MemoryMeter(device)

    print(
        f"'{args.config}' ({sum(n_params.values()) / 1e6:.0f} M parameters), {args.images} images of "
        f"{cfg.image_size}x{cfg.image_size}, {settings.ddim_steps} DDIM steps, {device}, "
        f"{torch.get_num_threads()} threads, load {load_average():.2f}",
        flush=True,
    )
    first: dict[str, float] = {}
    for v in todo:  # warm-up (and compilation) outside the timing; also the maps compared below
        t0 = time.perf_counter()
        run_variant(models[v.name], extractors[v.channels_last], images[: v.batch], v, settings)
        first[v.name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {v.name: [] for v in todo}
    peaks: dict[str, float] = {}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    loads = [load_average()]
    for r in range(args.repeats):
        for v in todo:
            meter.reset()
            t0 = time.perf_counter()
            outputs[v.name] = run_variant(models[v.name], extractors[v.channels_last], images, v, settings)
            times[v.name].append(time.perf_counter() - t0)
            peaks[v.name] = max(peaks.get(v.name, 0.0), meter.peak_mib())
            loads.append(load_average())
        print(f"  repeat {r + 1}/{args.repeats} done, load {loads[-1]:.2f}", flush=True)

    ref_maps, ref_scores = outputs[todo[0].name]
    results, rows = {}, []
    up_rate = args.images / min(times[todo[0].name])
    for v in todo:
        maps, scores = outputs[v.name]
        rate = args.images / min(times[v.name])
        precision = "bf16" if v.bf16 else "fp32"
        diff = (maps - ref_maps).abs().max().item()
        res = {
            **dataclasses.asdict(v),
            "precision": precision,
            "images_per_s": rate,
            "times_s": times[v.name],
            "first_call_s": first[v.name],
            "peak_memory_mib": peaks[v.name],
            "max_abs_map_diff": diff,
            "max_abs_score_diff": (scores - ref_scores).abs().max().item(),
            "tolerance": TOLERANCE[precision],
            "within_tolerance": diff <= TOLERANCE[precision],
            "speedup": rate / up_rate,
        }
        results[v.name] = res
        rows.append(
            [
                v.name,
                v.batch,
                2 if v.two_passes else 1,
                v.attention,
                "yes" if v.decode_autoencoder else "no",
                "yes" if v.channels_last else "no",
                precision,
                "yes" if v.compile else "no",
                rate,
                f"{res['speedup']:.2f}x",
                peaks[v.name],
                f"{diff:.1e} ({'ok' if res['within_tolerance'] else 'FAIL'})",
            ]
        )
    print(
        table(
            [
                "way",
                "batch",
                "passes",
                "attention",
                "AE visual decode",
                "channels_last",
                "precision",
                "compile",
                "images/s",
                "speed-up",
                f"peak {meter.kind} MiB",
                "max |map diff| vs upstream",
            ],
            rows,
        )
    )
    print(
        f"map range {ref_maps.min().item():.3f}..{ref_maps.max().item():.3f}; tolerance {TOLERANCE}; "
        f"load {min(loads):.2f}..{max(loads):.2f}"
    )
    profile = None
    if args.profile:
        profile = component_profile(
            models["ours"], extractor, args.batch, device, settings.ddim_steps, max(args.repeats, 1)
        )
        prow = [
            [
                r["part"],
                r["calls_per_image"],
                r["ms_per_image_per_call"],
                r["gflop_per_image_per_call"],
                r["calls_per_image"] * r["ms_per_image_per_call"] / 1000,
            ]
            for r in profile
        ]
        print(f"\nparts of ours (batch {args.batch}, fp32):")
        print(table(["part", "calls/image", "ms/image/call", "GFLOP/image/call", "s/image"], prow))
    out = {
        "config": args.config,
        "device": str(device),
        "images": args.images,
        "batch": args.batch,
        "ddim_steps": settings.ddim_steps,
        "params": n_params,
        "variants": results,
        "speedup_ours": results["ours"]["speedup"],
        "load_average_1min": loads,
        "tolerance": TOLERANCE,
        "memory_kind": meter.kind,
        "profile": profile,
    }
    path = write_results(f"inference_{args.config}", out, args.output)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
