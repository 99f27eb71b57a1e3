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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import MemoryMeter, load_average, table, write_results  # noqa: E402
from bench.inference_pipeline import (  # noqa: E402
    build_model,
    component_profile,
    model_for,
    run_variant,
    synthetic_images,
    variants,
)
from vlmdiff.cli import BATCH_SIZE  # noqa: E402
from vlmdiff.config import load_model_config  # noqa: E402
from vlmdiff.features import build_feature_extractor  # noqa: E402
from vlmdiff.reconstruction import ReconstructionSettings  # noqa: E402

# Largest |map difference| to upstream's way accepted, per compute precision (maps lie in [0, 6]).
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}


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
