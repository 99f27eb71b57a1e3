"""Typed configuration: dataclasses, YAML presets by name, dotted overrides, strict validation.

A config file is YAML whose keys must match the dataclass fields exactly: an unknown key, a missing
required key or a value of the wrong type fails at load time with the file and the key named. A file
may start from another preset with ``base: NAME`` and override only what differs.

    cfg = load_config("tiny", LatentDiffusionConfig, overrides=["unet.num_heads=2"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from utils.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

T = TypeVar("T")


@dataclass(frozen=True)
class UNetConfig:
    """The SD-1 UNet (openaimodel with spatial transformers). Defaults are SD-1.5's sizes."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors that get a spatial transformer
    num_heads: int = 8
    num_head_channels: int = -1  # -1: heads fixed, head dim = channels // num_heads
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    dropout: float = 0.0
    use_linear_in_transformer: bool = False  # SD-1: 1x1 conv proj_in / proj_out
    use_checkpoint: bool = False  # activation checkpointing (torch.utils.checkpoint) while training
    attention: str = "sdpa"  # "sdpa" (fused kernels) or "math" (explicit softmax(QK^T)V, upstream's way)


@dataclass(frozen=True)
class AutoencoderConfig:
    """The CompVis KL autoencoder (kl-f8 for SD-1.5)."""

    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = True
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    norm_groups: int = 32


@dataclass(frozen=True)
class CLIPTextArch:
    """Architecture of a CLIP text tower (transformers ``CLIPTextConfig`` fields); CLIP ViT-L/14 by default."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextEncoderConfig:
    """The frozen caption encoder whose last hidden state feeds the UNet's cross-attention.

    kind ``clip``: a CLIP text tower built from ``clip_arch`` (its weights normally come from the
    Stable Diffusion checkpoint); ``pretrained`` optionally names a transformers folder or hub id to
    load weights from; ``tokenizer`` is a folder/hub id, or ``bundled`` for the CLIP BPE vocabulary
    that ships with open_clip (the same token ids as openai/clip-vit-large-patch14, no download).
    kind ``hf``: any transformers text model (``AutoModel`` + ``AutoTokenizer``) from ``pretrained``.
    """

    kind: str = "clip"
    pretrained: str | None = None
    tokenizer: str = "bundled"
    max_length: int = 77
    clip_arch: CLIPTextArch = field(default_factory=CLIPTextArch)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    scale_factor: float = 0.18215
    logvar_init: float = 0.0


@dataclass(frozen=True)
class LatentDiffusionConfig:
    """Everything that fixes the weights' names and shapes of a latent diffusion model."""

    image_size: int = 256
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with validation.


def from_dict(cls: type[T], data: Any, where: str = "config", key: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys or wrong types raise :class:`UserError`.

    ``where`` names the file in messages and ``key`` the dotted path of this section in it.
    """
    section = key or "the top level"
    if not isinstance(data, dict):
        raise UserError(f"{where}: '{section}' must be a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown key '{_join(key, unknown[0])}' (valid keys in {section}: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, where, _join(key, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{where}: {section}: {e}") from e


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: {key}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {key}: expected a list, got {value!r}")
        (item, *_rest) = typing.get_args(tp)
        return tuple(_coerce(item, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, bool, str):
        if type(value) is not tp:
            raise UserError(f"{where}: {key}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp} at {key}")


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def preset_path(name: str) -> Path:
    """``name`` may be a preset in ``configs/`` (``tiny``, ``mid``, ``sd15``, ...) or a YAML path."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"config file {p} not found")
        return p
    candidate = CONFIG_DIR / f"{name}.yaml"
    if not candidate.is_file():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml") if _is_model_preset(x))
        raise UserError(f"unknown config preset '{name}': use one of {', '.join(known)} or a path to a .yaml file")
    return candidate


def _is_model_preset(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and ("base" in data or "unet" in data)


def load_raw(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """Read a preset/YAML file into plain data, resolving ``base:`` chains (deep merge)."""
    path = preset_path(name)
    if str(path) in _seen:
        raise UserError(f"{path}: circular 'base:' chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(load_raw(base, _seen + (str(path),)), data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to plain config data."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"config override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"config override '{item}': cannot parse value ({e})") from e
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p, {})
            if not isinstance(child, dict):
                raise UserError(f"config override '{item}': '{p}' is not a section")
            node[p] = dict(child)
            node = node[p]
        node[parts[-1]] = value
    return data


def load_config(name: str, cls: type[T], overrides: Sequence[str] = (), only_own_sections: bool = False) -> T:
    """Load preset/YAML ``name`` (with ``base:`` chains and dotted overrides) as dataclass ``cls``.

    ``only_own_sections`` keeps just the top-level keys that ``cls`` has, so the generic
    :class:`LatentDiffusionConfig` can be read from a preset that also configures a model built on it.
    """
    data = apply_overrides(load_raw(name), overrides)
    if only_own_sections:
        own = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in own}
    return from_dict(cls, data, str(preset_path(name)))
