"""Stable Diffusion folders in diffusers layout -> one state dict in CompVis names.

A diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ...) holds the same
tensors as ``v1-5-pruned.ckpt`` under other names. :func:`load_diffusers_folder` finds and reads the
three weight files, checks the folder's configs against ours, and renames the weights with
:mod:`ldm.diffusers_names` (``unet/`` -> ``model.diffusion_model.*``, ``vae/`` -> ``first_stage_model.*``,
``text_encoder/`` -> ``cond_stage_model.transformer.text_model.*``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import load_state_dict
from ldm.config import AutoencoderConfig, UNetConfig
from ldm.diffusers_names import (
    convert_clip_state_dict,
    convert_unet_state_dict,
    convert_vae_state_dict,
    unet_has_attention,
)
from ldm.modules.unet import attention_heads
from utils.errors import UserError

log = logging.getLogger(__name__)

COMPONENT_WEIGHTS = {  # component folder -> weight files in order of preference (diffusers' / transformers' names)
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}

# unet/config.json fields that change the computation without changing any weight's name or shape:
# (field, diffusers' default when absent, the value our UNet computes with).
UNET_FIXED_FIELDS = (
    ("flip_sin_to_cos", True, True),  # time embedding [cos, sin]
    ("freq_shift", 0, 0),
    ("act_fn", "silu", "silu"),
    ("center_input_sample", False, False),
    ("time_embedding_type", "positional", "positional"),
    ("norm_eps", 1e-5, 1e-5),
)


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True for a folder with ``model_index.json``, or with ``unet/`` and ``vae/`` subfolders."""
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or ((p / "unet").is_dir() and (p / "vae").is_dir()))


def _with_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (diffusers' naming of weight variants)."""
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def _find_weights(folder: Path, component: str, variant: str | None) -> Path:
    """The weight file of ``folder/component``: the plain file, else (no ``variant`` given) the fp16 one."""
    sub = folder / component
    if not sub.is_dir():
        raise UserError(
            f"{folder}: no {component}/ folder; a Stable Diffusion folder in diffusers layout has "
            "unet/, vae/ and text_encoder/ with their weights (download the complete folder)"
        )
    names = [
        _with_variant(n, v) for v in ([variant] if variant else [None, "fp16"]) for n in COMPONENT_WEIGHTS[component]
    ]
    path = next((sub / n for n in names if (sub / n).is_file()), None)
    if path is None:
        raise UserError(f"{sub}: no weight file; expected one of {', '.join(names)}")
    if variant is None and ".fp16." in path.name:
        log.info("%s: no full-precision file, using %s", sub, path.name)
    return path


def _read_float32(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors / torch ``.bin`` state dict (weights_only) with half-precision floats made float32."""
    sd = load_state_dict(path)
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in sd.items()}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def check_unet_folder_config(data: Mapping[str, Any], cfg: UNetConfig, where: str = "unet/config.json") -> None:
    """Reject a diffusers UNet config that computes differently from our UNet with the same weights.

    Names and shapes cannot tell the time-embedding layout or the number of attention heads; these
    are checked here. In SD-1 configs diffusers' ``attention_head_dim`` is the number of heads.
    """
    for key, default, ours in UNET_FIXED_FIELDS:
        value = data.get(key, default)
        if value != ours:
            raise UserError(
                f"{where}: {key} is {value!r}, but the SD-1 UNet computes with {ours!r}; "
                "this folder is not a Stable Diffusion 1.x model"
            )
    heads = data.get("num_attention_heads") or data.get("attention_head_dim", 8)
    levels = len(cfg.channel_mult)
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    if len(per_level) != levels:
        raise UserError(f"{where}: {len(per_level)} attention head counts for {levels} levels (unet.channel_mult)")
    checks = [(lvl, per_level[lvl]) for lvl in range(levels) if unet_has_attention(cfg, lvl)]
    checks.append((levels - 1, per_level[-1]))  # the middle block
    for level, theirs in checks:
        ours_heads = attention_heads(cfg, cfg.model_channels * cfg.channel_mult[level])[0]
        if theirs != ours_heads:
            raise UserError(
                f"{where}: {theirs} attention heads at level {level}, but unet.num_heads / "
                f"num_head_channels give {ours_heads}; set unet.num_heads={theirs} (num_head_channels -1)"
            )


def _clip_reference(folder: Path) -> dict[str, torch.Size] | None:
    """Names -> shapes of a ``CLIPTextModel`` built (on meta) from ``text_encoder/config.json``."""
    path = folder / "text_encoder" / "config.json"
    if not path.is_file():
        log.warning("%s missing: the text encoder's weights are checked by name only", path)
        return None
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        hf_cfg = CLIPTextConfig.from_pretrained(str(path.parent))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a CLIP text config ({e})") from e
    with torch.device("meta"):
        model = CLIPTextModel(hf_cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_diffusers_folder(
    path: str | os.PathLike, *, unet_cfg: UNetConfig, ae_cfg: AutoencoderConfig, variant: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a Stable Diffusion folder in diffusers layout as one state dict in CompVis names.

    Returns float32 ``model.diffusion_model.*``, ``first_stage_model.*`` and
    ``cond_stage_model.transformer.text_model.*`` (+ ``position_ids``) tensors. Reads
    ``unet/diffusion_pytorch_model.{safetensors,bin}``, ``vae/`` likewise and
    ``text_encoder/{model.safetensors,pytorch_model.bin}``; ``variant`` (e.g. ``fp16``) picks
    ``*.fp16.*`` files, and without it they are the fallback. Schedule buffers are not included
    (they follow from the diffusion config).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    if not is_diffusers_folder(folder):
        absent = [n for n in ("model_index.json", "unet/", "vae/") if not (folder / n).exists()]
        raise UserError(f"{folder}: not a Stable Diffusion folder in diffusers layout (no {', no '.join(absent)})")
    files = {c: _find_weights(folder, c, variant) for c in COMPONENT_WEIGHTS}  # fail before reading gigabytes
    unet_json = _read_json(folder / "unet" / "config.json")
    if unet_json is not None:
        check_unet_folder_config(unet_json, unet_cfg, str(folder / "unet" / "config.json"))
    clip_reference = _clip_reference(folder)
    sd: dict[str, torch.Tensor] = {}
    sd.update(convert_unet_state_dict(_read_float32(files["unet"]), unet_cfg, str(files["unet"])))
    sd.update(convert_vae_state_dict(_read_float32(files["vae"]), ae_cfg, str(files["vae"])))
    sd.update(
        convert_clip_state_dict(
            _read_float32(files["text_encoder"]),
            context_dim=unet_cfg.context_dim,
            reference=clip_reference,
            where=str(files["text_encoder"]),
        )
    )
    log.info("%s: converted %d diffusers tensors to CompVis names", folder, len(sd))
    return sd
