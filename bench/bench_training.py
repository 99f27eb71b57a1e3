"""Training-step memory and time: measured at small presets, by analysis at any size (SD-1.5 included).

(a) Analysis, without allocating anything (fake tensors): parameter counts (total / trainable per
part), bytes of weights, gradients and AdamW state, and the activation memory of one training
step -- the bytes of every tensor autograd saves for the backward pass (deduplicated by storage,
weights excluded), counted while a real forward runs on fake tensors, so bf16 autocast and
activation checkpointing are accounted exactly as they behave. Predicted GPU peak = weights + AdamW
state + gradients + max(saved activations, AdamW temporaries) + a CUDA context allowance; torch's
default (foreach) AdamW makes a temporary as large as the trainable weights, the fused one none.
(b) Measurement, one fresh child process per setting: seconds per training step (forward,
backward, AdamW step; after two warm-up steps) and peak memory above the memory after the model
is built (CPU: peak RSS; CUDA: torch.cuda.max_memory_allocated), compared with (a)'s prediction
of the same quantity (AdamW state + gradients + activations; on a GPU + the AdamW temporaries where
larger than the activations; a CPU runs AdamW tensor by tensor). Settings run in turn,
``--repeats`` times (interleaved); the best time counts.

Options: precision fp32 / bf16-mixed (autocast), activation checkpointing
(``unet.use_checkpoint=true``: ResBlocks and transformer blocks of the SG network and the UNet
decoder recompute their activations in the backward pass), fused AdamW. The frozen parts
(autoencoder, text encoder, the UNet's time embedding, input and middle blocks) never hold
autograd state: the model runs them under no_grad (vlmdiff.model); (a) also reports what they
would save if they did.

    python bench/bench_training.py --measure tiny,mid --analyse tiny,mid,sd15 --batches 4,12
    python bench/bench_training.py --device cuda --measure sd15 --analyse sd15 --batches 4,12   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import MemoryMeter, load_average, table, write_results  # noqa: E402
from bench.training_analysis import (  # noqa: E402
    CUDA_CONTEXT_GIB,
    GPU_BUDGET_GIB,
    MIB,
    SETTINGS,
    Setting,
    analyse,
    build,
    print_analysis,
    training_batch,
)


def child_measure(config: str, batch: int, setting: Setting, steps: int, device: torch.device) -> dict[str, Any]:
    """Child mode: build, two warm-up steps, then time ``steps`` steps; memory above the built model."""
    torch.manual_seed(0)
    meter = MemoryMeter(device)
    with torch.device(device):  # initialised where it runs (fast on a GPU)
        model = build(config, setting)
    opt = model.configure_optimizers()
    data = training_batch(model, batch, device)
    meter.reset()
    built = meter.base
    times = []
    for i in range(2 + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setting.precision == "bf16-mixed"):
            loss = model.diffusion_loss(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "step_s": min(times),
        "times_s": times,
        "extra_peak_mib": meter.peak_mib(),
        "built_mib": built,
        "memory_kind": meter.kind,
        "loss": float(loss.detach()),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", default="tiny,mid", help="presets to measure (comma list; '' for none)")
    p.add_argument("--analyse", default="tiny,mid,sd15", help="presets to analyse (comma list)")
    p.add_argument("--batches", default="4", help="batch sizes (comma list), for both parts")
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of measurements")
    p.add_argument(
        "--settings",
        default="all",
        help="'all', or indices into: " + ", ".join(f"{i} {s.name}" for i, s in enumerate(SETTINGS)),
    )
    p.add_argument(
        "--measure_bf16_on_cpu", action="store_true", help="also measure bf16-mixed on a CPU (slow without native bf16)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/training.json)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args._child:
        job = json.loads(args._child)
        res = child_measure(job["config"], job["batch"], Setting(**job["setting"]), job["steps"], device)
        print(json.dumps(res))
        return res
    settings = list(SETTINGS) if args.settings == "all" else [SETTINGS[int(i)] for i in args.settings.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    measure = [c for c in args.measure.split(",") if c]

    analysis: dict[str, dict[str, Any]] = {}
    print(f"(a) analysis (fake tensors, nothing allocated), batches {batches}", flush=True)
    for c in [c for c in args.analyse.split(",") if c]:
        analysis[c] = {f"batch {b} | {s.name}": analyse(c, b, s) for b in batches for s in settings}
        print_analysis(c, analysis[c])

    measured: dict[str, dict[str, Any]] = {}
    if measure:
        todo = [
            (c, b, s)
            for c in measure
            for b in batches
            for s in settings
            if s.precision == "fp32" or device.type == "cuda" or args.measure_bf16_on_cpu
        ]
        print(f"\n(b) measured training steps, {device}, load {load_average():.2f}", flush=True)
        for _ in range(args.repeats):
            for c, b, s in todo:
                job = {"config": c, "batch": b, "setting": dataclasses.asdict(s), "steps": args.steps}
                res, child_rss = common.run_child(
                    Path(__file__).resolve(), ["--device", args.device, "--_child", json.dumps(job)]
                )
                key = f"{c} | batch {b} | {s.name}"
                old = measured.get(key, {"times_s": [], "load_average_1min": []})
                res["times_s"] = old["times_s"] + res["times_s"]
                res["step_s"] = min(res["times_s"])
                res["child_peak_rss_mib"] = child_rss
                res["load_average_1min"] = old["load_average_1min"] + [load_average()]
                measured[key] = res
        rows = []
        for key, res in measured.items():
            c, b, name = key.split(" | ")
            batch = int(b.split()[1])
            setting = next(s for s in settings if s.name == name)
            pred = analysis[c][f"{b} | {name}"] if c in analysis else analyse(c, batch, setting)
            res["predicted_extra_mib"] = pred[f"step_extra_bytes_{'gpu' if device.type == 'cuda' else 'cpu'}"] / MIB
            rows.append(
                [
                    c,
                    batch,
                    name,
                    res["step_s"],
                    res["built_mib"],
                    res["extra_peak_mib"],
                    res["predicted_extra_mib"],
                    res["extra_peak_mib"] / res["predicted_extra_mib"],
                ]
            )
        kind = next(iter(measured.values()))["memory_kind"]
        print(
            table(
                [
                    "preset",
                    "batch",
                    "setting",
                    "s/step",
                    "memory after build MiB",
                    f"step peak, {kind} MiB",
                    "predicted MiB",
                    "measured / predicted",
                ],
                rows,
            )
        )
    out = {
        "device": str(device),
        "batches": batches,
        "analysis": analysis,
        "measured": measured,
        "gpu_budget_gib": GPU_BUDGET_GIB,
        "cuda_context_allowance_gib": CUDA_CONTEXT_GIB,
    }
    path = write_results("training", out, args.output)
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
