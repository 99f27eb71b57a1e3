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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import MemoryMeter, load_average, table, write_results  # noqa: E402
from vlmdiff.config import load_model_config  # noqa: E402
from vlmdiff.model import VLMDiff  # noqa: E402

GIB = 2**30
MIB = 2**20
GPU_BUDGET_GIB = 24.0
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuDNN/cuBLAS workspaces and allocator slack (allowance)
PARTS = {  # parameter-name prefix -> part
    "control_model.": "SG network",
    "model.diffusion_model.output_blocks.": "UNet decoder",
    "model.diffusion_model.out.": "UNet decoder",
    "model.diffusion_model.": "UNet encoder half + time embedding",
    "first_stage_model.": "autoencoder",
    "cond_stage_model.": "text encoder",
}


@dataclass(frozen=True)
class Setting:
    """One training configuration."""

    precision: str = "fp32"  # "fp32" or "bf16-mixed"
    checkpointing: bool = False
    fused_adamw: bool = False

    @property
    def name(self) -> str:
        parts = (
            [self.precision]
            + (["checkpointing"] if self.checkpointing else [])
            + (["fused AdamW"] if self.fused_adamw else [])
        )
        return " + ".join(parts)

    def overrides(self) -> list[str]:
        return ["unet.use_checkpoint=true"] if self.checkpointing else []


SETTINGS = (
    Setting(),
    Setting(checkpointing=True),
    Setting(fused_adamw=True),
    Setting("bf16-mixed"),
    Setting("bf16-mixed", checkpointing=True),
    Setting("bf16-mixed", True, True),
)


def build(config: str, setting: Setting) -> VLMDiff:
    """A random-weight VLMDiff in training mode (AdamW as configure_optimizers makes it)."""
    cfg = load_model_config(config, setting.overrides())
    return VLMDiff(cfg, load_pretrained_text=False, fused_optimizer=setting.fused_adamw).train()


def training_batch(model: VLMDiff, batch: int, device: torch.device | str) -> dict[str, Any]:
    """Random normalised images (the hint is the image) and empty captions."""
    size = model.cfg.image_size
    image = torch.randn(batch, 3, size, size, device=device)
    return {"image": image, "hint": image, "caption": [""] * batch}


def parameter_table(model: VLMDiff) -> dict[str, dict[str, int]]:
    """Parameters per part: {part: {"total": n, "trainable": n}} plus "all"."""
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        part = next(v for k, v in PARTS.items() if name.startswith(k))
        row = out.setdefault(part, {"total": 0, "trainable": 0})
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
    out["all"] = {k: sum(r[k] for r in list(out.values())) for k in ("total", "trainable")}
    return out


def saved_activation_bytes(model: VLMDiff, batch: dict[str, Any], bf16: bool) -> int:
    """Bytes autograd saves for the backward pass of one loss (storages counted once, weights excluded).

    With ``bf16`` the forward runs under CPU autocast (fake tensors are CPU tensors); its casting
    rules for convolutions, matrix products and norms are those of CUDA autocast.
    """
    # LatentDiffusion.diffusion_loss step by step, with one timestep for the batch: fake tensors have no values
    # for the UNet's "all timesteps equal?" test; the time embedding is then (1, D) instead of (B, D), a few KiB
    t = torch.full((1,), model.num_timesteps // 2)

    def loss() -> None:
        z = model.encode_first_stage(batch["image"])
        noise = torch.randn_like(z)
        eps = model.apply_model(model.q_sample(z, t, noise), t, model.get_conditions(batch))
        torch.nn.functional.mse_loss(eps.float(), noise.float())

    return _saved_bytes(model, loss, bf16)


def _saved_bytes(model: VLMDiff, forward: Callable[[], Any], bf16: bool) -> int:
    """Bytes of the tensors autograd saves while ``forward()`` runs.

    Each storage counts once; the model's weights are excluded.
    """
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        s = x.untyped_storage()
        if s._cdata not in weights:
            saved[s._cdata] = s.nbytes()
        return x

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):
        forward()
    return sum(saved.values())


def analyse(config: str, batch: int, setting: Setting) -> dict[str, Any]:
    """Parameter counts and predicted bytes of one training step, computed on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = build(config, setting)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))  # fake CPU tensors: shapes and dtypes only
        params = parameter_table(model)
        data = training_batch(model, batch, "cpu")
        act = saved_activation_bytes(model, data, setting.precision == "bf16-mixed")
        frozen_act = frozen_encoder_activation_bytes(model, data, setting.precision == "bf16-mixed")
    total, trainable = params["all"]["total"], params["all"]["trainable"]
    weights, grads, adam = 4 * total, 4 * trainable, 8 * trainable  # fp32 master weights in both precisions
    # torch's default (foreach) AdamW on a GPU makes one temporary as large as all trainable weights
    # (sqrt of the second moments); the fused kernel makes none. By then the activations are freed.
    opt_tmp = 0 if setting.fused_adamw else 4 * trainable
    peak = weights + adam + grads + max(act, opt_tmp)
    gpu_gib = peak / GIB + CUDA_CONTEXT_GIB
    return {
        "config": config,
        "batch": batch,
        "setting": setting.name,
        "params": params,
        "weights_bytes": weights,
        "grads_bytes": grads,
        "adamw_state_bytes": adam,
        "activation_bytes": act,
        "frozen_encoder_activation_bytes_if_recorded": frozen_act,
        "optimizer_temporary_bytes_gpu": opt_tmp,
        "step_extra_bytes_cpu": adam + grads + act,
        "step_extra_bytes_gpu": adam + grads + max(act, opt_tmp),
        "peak_bytes": peak,
        "peak_gpu_gib": gpu_gib,
        "fits_gpu_budget": gpu_gib <= GPU_BUDGET_GIB,
    }


def frozen_encoder_activation_bytes(model: VLMDiff, batch: dict[str, Any], bf16: bool) -> int:
    """What the UNet's frozen encoder half would save for backward if it ran with autograd (it does not)."""
    unet = model.model.diffusion_model
    z = torch.randn(
        batch["image"].shape[0],
        unet.cfg.in_channels,
        *(s // model.first_stage_factor for s in batch["image"].shape[2:]),
    )
    t = torch.full((1,), model.num_timesteps // 2)  # one timestep: see saved_activation_bytes
    context = torch.randn(z.shape[0], 77, unet.cfg.context_dim)
    z.requires_grad_(True)  # stands for a trainable input; the weights stay frozen
    return _saved_bytes(model, lambda: unet.encode(z, unet.embed_time(t), context), bf16)


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


def print_analysis(config: str, by_key: dict[str, dict[str, Any]]) -> None:
    """Parameter table and predicted GiB per setting and batch size of one preset."""
    first = next(iter(by_key.values()))
    print(f"\n'{config}': parameters (M) per part")
    print(
        table(
            ["part", "total M", "trainable M"],
            [[k, v["total"] / 1e6, v["trainable"] / 1e6] for k, v in first["params"].items()],
        )
    )
    rows = [
        [
            a["batch"],
            a["setting"],
            a["weights_bytes"] / GIB,
            a["grads_bytes"] / GIB,
            a["adamw_state_bytes"] / GIB,
            a["activation_bytes"] / GIB,
            a["frozen_encoder_activation_bytes_if_recorded"] / GIB,
            a["optimizer_temporary_bytes_gpu"] / GIB,
            a["peak_bytes"] / GIB,
            a["peak_gpu_gib"],
            "yes" if a["fits_gpu_budget"] else "no",
        ]
        for a in by_key.values()
    ]
    print(
        f"'{config}': predicted GiB of one training step on a GPU (fp32 master weights and AdamW state; "
        "peak = weights + AdamW state + grads + max(activations, AdamW temporaries))"
    )
    print(
        table(
            [
                "batch",
                "setting",
                "weights",
                "grads",
                "AdamW state",
                "activations",
                "(frozen encoder half, not kept)",
                "AdamW temporaries",
                "peak",
                f"peak + {CUDA_CONTEXT_GIB:.0f} GiB CUDA",
                f"fits {GPU_BUDGET_GIB:.0f} GiB GPU",
            ],
            rows,
        )
    )


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
