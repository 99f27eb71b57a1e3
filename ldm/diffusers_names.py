"""diffusers / transformers weight names -> CompVis state-dict names, as pure functions of the weights.

A Stable Diffusion model in diffusers layout holds the same tensors as ``v1-5-pruned.ckpt`` under
other names. The ``convert_*_state_dict`` functions rename one sub-model's state dict to the names our
modules (and upstream's checkpoints) use:

* UNet         -> ``model.diffusion_model.*`` (``down_blocks.1.resnets.0.conv1`` ->
  ``input_blocks.4.0.in_layers.2``; block indices follow from the UNet config),
* VAE          -> ``first_stage_model.*`` (``decoder.up_blocks.0`` -> ``decoder.up.3``; the
  mid-block attention's linear projections become 1x1 convolutions),
* text encoder -> ``cond_stage_model.transformer.text_model.*`` (+ ``position_ids``).

Every source tensor is used exactly once and every weight of our modules is produced with its shape,
or one :class:`UserError` names the file, the first offending key and what was expected. They also
accept meta tensors, so the names of an SD-1.5-size model can be checked for free. Reading a folder
is :mod:`ldm.convert_diffusers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ldm.checkpoint import describe_mismatch
from ldm.config import AutoencoderConfig, UNetConfig
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.text_encoder import SD_CLIP_PREFIX, canonical_clip_names
from ldm.modules.unet import UNetModel
from utils.errors import UserError

UNET_PREFIX = "model.diffusion_model."
AE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model."
CLIP_TARGET_PREFIX = CLIP_PREFIX + "transformer." + SD_CLIP_PREFIX

# Inner names of a diffusers ResnetBlock2D in the UNet -> openaimodel ResBlock.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Inner names of a diffusers ResnetBlock2D in the VAE -> CompVis ResnetBlock.
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# Inner names of the VAE's single-head attention (current and pre-0.14 diffusers) -> CompVis AttnBlock.
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}


@dataclass(frozen=True)
class _Rule:
    """Where one diffusers module goes: our module path, how its inner names map, and reshaping.

    ``inner`` None keeps the inner names (plain layers and spatial transformers, whose names agree);
    ``linear_to_conv`` turns (C_out, C_in) linear weights into (C_out, C_in, 1, 1) 1x1 convolutions.
    """

    target: str
    inner: Mapping[str, str] | None = None
    linear_to_conv: bool = False


# ---------------------------------------------------------------------------------------------
# Rule tables derived from the configs.


def unet_has_attention(cfg: UNetConfig, level: int) -> bool:
    """Whether level ``level`` of the UNet (0 = full resolution, downsampling 2**level) has attention."""
    return 2**level in cfg.attention_resolutions


def unet_rules(cfg: UNetConfig) -> dict[str, _Rule]:
    """diffusers ``UNet2DConditionModel`` module paths -> our ``UNetModel`` module paths for ``cfg``.

    Input block indices: 0 is ``conv_in``; level l's residual block j is ``1 + l (n+1) + j`` and its
    downsampler ``(l+1)(n+1)``, with n = num_res_blocks. diffusers' ``up_blocks.i`` is level L-1-i;
    its residual block j is output block ``i (n+1) + j``, the upsampler sits in the last of them.
    """
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    rules = {
        "conv_in": _Rule("input_blocks.0.0"),
        "time_embedding.linear_1": _Rule("time_embed.0"),
        "time_embedding.linear_2": _Rule("time_embed.2"),
        "mid_block.resnets.0": _Rule("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": _Rule("middle_block.1"),
        "mid_block.resnets.1": _Rule("middle_block.2", UNET_RESNET),
        "conv_norm_out": _Rule("out.0"),
        "conv_out": _Rule("out.2"),
    }
    for level in range(levels):
        attn = unet_has_attention(cfg, level)
        for j in range(n):
            block = 1 + level * (n + 1) + j
            rules[f"down_blocks.{level}.resnets.{j}"] = _Rule(f"input_blocks.{block}.0", UNET_RESNET)
            if attn:
                rules[f"down_blocks.{level}.attentions.{j}"] = _Rule(f"input_blocks.{block}.1")
        if level < levels - 1:
            rules[f"down_blocks.{level}.downsamplers.0.conv"] = _Rule(f"input_blocks.{(level + 1) * (n + 1)}.0.op")
    for i in range(levels):
        level = levels - 1 - i
        attn = unet_has_attention(cfg, level)
        for j in range(n + 1):
            block = i * (n + 1) + j
            rules[f"up_blocks.{i}.resnets.{j}"] = _Rule(f"output_blocks.{block}.0", UNET_RESNET)
            if attn:
                rules[f"up_blocks.{i}.attentions.{j}"] = _Rule(f"output_blocks.{block}.1")
        if level > 0:
            rules[f"up_blocks.{i}.upsamplers.0.conv"] = _Rule(
                f"output_blocks.{i * (n + 1) + n}.{2 if attn else 1}.conv"
            )
    return rules


def vae_rules(cfg: AutoencoderConfig) -> dict[str, _Rule]:
    """diffusers ``AutoencoderKL`` module paths -> CompVis ``AutoencoderKL`` module paths for ``cfg``.

    Encoder levels keep their index; the decoder's ``up_blocks.i`` is level L-1-i (``decoder.up.L-1-i``).
    """
    n, levels = cfg.num_res_blocks, len(cfg.ch_mult)
    rules = {
        "quant_conv": _Rule("quant_conv"),
        "post_quant_conv": _Rule("post_quant_conv"),
    }
    for side in ("encoder", "decoder"):
        rules[f"{side}.conv_in"] = _Rule(f"{side}.conv_in")
        rules[f"{side}.conv_norm_out"] = _Rule(f"{side}.norm_out")
        rules[f"{side}.conv_out"] = _Rule(f"{side}.conv_out")
        rules[f"{side}.mid_block.resnets.0"] = _Rule(f"{side}.mid.block_1", VAE_RESNET)
        rules[f"{side}.mid_block.attentions.0"] = _Rule(f"{side}.mid.attn_1", VAE_ATTENTION, linear_to_conv=True)
        rules[f"{side}.mid_block.resnets.1"] = _Rule(f"{side}.mid.block_2", VAE_RESNET)
    for level in range(levels):
        attn = cfg.resolution // 2**level in cfg.attn_resolutions
        for j in range(n):
            rules[f"encoder.down_blocks.{level}.resnets.{j}"] = _Rule(f"encoder.down.{level}.block.{j}", VAE_RESNET)
            if attn:
                rules[f"encoder.down_blocks.{level}.attentions.{j}"] = _Rule(
                    f"encoder.down.{level}.attn.{j}", VAE_ATTENTION, linear_to_conv=True
                )
        if level < levels - 1:
            rules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = _Rule(f"encoder.down.{level}.downsample.conv")
    for i in range(levels):
        level = levels - 1 - i
        attn = cfg.resolution // 2**level in cfg.attn_resolutions
        for j in range(n + 1):
            rules[f"decoder.up_blocks.{i}.resnets.{j}"] = _Rule(f"decoder.up.{level}.block.{j}", VAE_RESNET)
            if attn:
                rules[f"decoder.up_blocks.{i}.attentions.{j}"] = _Rule(
                    f"decoder.up.{level}.attn.{j}", VAE_ATTENTION, linear_to_conv=True
                )
        if level > 0:
            rules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = _Rule(f"decoder.up.{level}.upsample.conv")
    return rules


# ---------------------------------------------------------------------------------------------
# The renaming itself and its checks.


def _rename(key: str, rules: Mapping[str, _Rule]) -> tuple[str, _Rule] | None:
    """Our name for diffusers tensor ``key`` (longest module path that has a rule), or None."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        rule = rules.get(".".join(parts[:depth]))
        if rule is None:
            continue
        rest = ".".join(parts[depth:])
        if rule.inner is None:
            return f"{rule.target}.{rest}", rule
        for src, dst in rule.inner.items():
            if rest.startswith(src + "."):
                return f"{rule.target}.{dst}{rest[len(src) :]}", rule
        return None
    return None


def _source_name(target: str, rules: Mapping[str, _Rule]) -> str | None:
    """The diffusers name that would have become our ``target`` (for error messages)."""
    for src, rule in rules.items():
        if not target.startswith(rule.target + "."):
            continue
        rest = target[len(rule.target) + 1 :]
        if rule.inner is None:
            return f"{src}.{rest}"
        for inner_src, inner_dst in rule.inner.items():
            if rest.startswith(inner_dst + "."):
                return f"{src}.{inner_src}{rest[len(inner_dst) :]}"
    return None


def _apply_rules(
    sd: Mapping[str, torch.Tensor],
    rules: Mapping[str, _Rule],
    prefix: str,
    expected: Mapping[str, torch.Size],
    where: str,
    what: str,
    hint: str,
) -> dict[str, torch.Tensor]:
    """Rename ``sd`` with ``rules`` under ``prefix`` and check it against ``expected`` (names -> shapes)."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    unconverted = []
    for key, value in sd.items():
        hit = _rename(key, rules)
        if hit is None:
            unconverted.append(key)
            continue
        name, rule = hit
        name = prefix + name
        if name in origin:
            problems.append(f"'{origin[name]}' and '{key}' both become {name}")
            continue
        if rule.linear_to_conv and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[name], origin[name] = value, key
    if unconverted:
        problems.insert(0, f"{len(unconverted)} key(s) with no place in it, e.g. '{sorted(unconverted)[0]}'")
    unexpected = sorted(k for k in out if k not in expected)
    if unexpected:
        k = unexpected[0]
        problems.append(f"{len(unexpected)} key(s) renamed to names it does not have, e.g. '{origin[k]}' -> {k}")
    missing = sorted(k for k in expected if k not in out)
    if missing:
        src = _source_name(missing[0][len(prefix) :], rules)
        problems.append(
            f"{len(missing)} weight(s) missing, e.g. {missing[0]}" + (f" (diffusers name '{src}')" if src else "")
        )
    shapes = sorted(k for k in out if k in expected and tuple(out[k].shape) != tuple(expected[k]))
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} with another shape, e.g. '{origin[k]}' {tuple(out[k].shape)} "
            f"but {k} is {tuple(expected[k])}"
        )
    if problems:
        raise UserError(f"{where}: cannot convert to {what}: {'; '.join(problems)}; {hint}")
    return out


def _describe_unet(cfg: UNetConfig) -> str:
    levels = [lvl for lvl in range(len(cfg.channel_mult)) if unet_has_attention(cfg, lvl)]
    return (
        f"our UNet (model_channels {cfg.model_channels}, channel_mult {list(cfg.channel_mult)}, "
        f"num_res_blocks {cfg.num_res_blocks}, attention at levels {levels}, context_dim {cfg.context_dim})"
    )


def _describe_vae(cfg: AutoencoderConfig) -> str:
    return (
        f"our autoencoder (ch {cfg.ch}, ch_mult {list(cfg.ch_mult)}, num_res_blocks {cfg.num_res_blocks}, "
        f"attn_resolutions {list(cfg.attn_resolutions)})"
    )


_CONFIG_HINT = "the folder's weights must have the structure of the chosen config (e.g. --config sd15 for SD-1.x)"


def convert_unet_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: UNetConfig, where: str = "unet"
) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` weights -> ``model.diffusion_model.*`` for a UNet of ``cfg``.

    Pure renaming (tensors are not copied); works on meta tensors. Raises :class:`UserError` naming
    ``where`` unless every key converts and the result has exactly our UNet's names and shapes.
    """
    with torch.device("meta"):
        expected = {UNET_PREFIX + k: v.shape for k, v in UNetModel(cfg).state_dict().items()}
    return _apply_rules(sd, unet_rules(cfg), UNET_PREFIX, expected, where, _describe_unet(cfg), _CONFIG_HINT)


def convert_vae_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: AutoencoderConfig, where: str = "vae"
) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` weights -> ``first_stage_model.*`` for an autoencoder of ``cfg``.

    The attention projections (``to_q`` ... or the older ``query`` ...) become 1x1 convolutions.
    """
    with torch.device("meta"):
        expected = {AE_PREFIX + k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}
    return _apply_rules(sd, vae_rules(cfg), AE_PREFIX, expected, where, _describe_vae(cfg), _CONFIG_HINT)


def _strip_text_model(key: str) -> str:
    return key[len(SD_CLIP_PREFIX) :] if key.startswith(SD_CLIP_PREFIX) else key


def convert_clip_state_dict(
    sd: Mapping[str, torch.Tensor],
    *,
    context_dim: int | None = None,
    reference: Mapping[str, torch.Size] | None = None,
    where: str = "text_encoder",
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` weights (with or without ``text_model.``) -> SD-1.5 names.

    Returns ``cond_stage_model.transformer.text_model.*`` with a ``position_ids`` buffer.
    ``reference`` (names -> shapes of a ``CLIPTextModel`` built from the folder's config, any naming)
    makes the check exact; ``context_dim`` checks the hidden size against the UNet's cross-attention.
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        rest = _strip_text_model(key)
        if CLIP_TARGET_PREFIX + rest in renamed:
            raise UserError(f"{where}: '{rest}' is there both with and without the '{SD_CLIP_PREFIX}' prefix")
        renamed[CLIP_TARGET_PREFIX + rest] = value
    out = canonical_clip_names(renamed, CLIP_PREFIX)
    token_key = CLIP_TARGET_PREFIX + "embeddings.token_embedding.weight"
    if token_key not in out:
        raise UserError(
            f"{where}: not a CLIP text model (no embeddings.token_embedding.weight among "
            f"{len(sd)} keys, e.g. '{next(iter(sd), '')}')"
        )
    width = out[token_key].shape[1]
    if context_dim is not None and width != context_dim:
        raise UserError(
            f"{where}: the text encoder's hidden size is {width} but unet.context_dim is {context_dim}; "
            "use the config that matches this Stable Diffusion folder"
        )
    if reference is not None:
        ref = canonical_clip_names(
            {
                CLIP_TARGET_PREFIX + _strip_text_model(k): torch.empty(shape, device="meta")
                for k, shape in reference.items()
            },
            CLIP_PREFIX,
        )
        problem = describe_mismatch({k: v.shape for k, v in ref.items()}, out)
        if problem:
            raise UserError(f"{where}: the weights do not fit the CLIPTextModel of its config.json: {problem}")
    return out
