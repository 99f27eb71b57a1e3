"""Part (a) of bench_training.py: parameter counts and the memory of one training step, by analysis.

Nothing is allocated (fake tensors): parameter counts (total / trainable per part), bytes of weights,
gradients and AdamW state, and the activation memory of one training step -- the bytes of every
tensor autograd saves for the backward pass (deduplicated by storage, weights excluded), counted while
a real forward runs on fake tensors, so bf16 autocast and activation checkpointing are accounted
exactly as they behave. Also the training settings (:class:`Setting`) both parts of the benchmark use.

The scripts put the repository root on ``sys.path`` themselves and import this as
``bench.training_analysis``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.common import table
from vlmdiff.config import load_model_config
from vlmdiff.model import VLMDiff

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
