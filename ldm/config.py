"""Typed configuration: dataclasses as OmegaConf structured configs, YAML presets by name, dotlist overrides.

The dataclasses below are the typed API the code uses (``cfg.unet.model_channels``). Reading a config
merges, in order, onto ``OmegaConf.structured(cls)``: the YAML files of a preset's ``base:`` chain
(``configs/tiny.yaml`` says ``base: sd15`` and overrides only what differs), then ``key=value`` dotlist
overrides; ``OmegaConf.to_object`` gives the frozen dataclass back. An unknown key or a value of the
wrong type fails at load time as one :class:`UserError` line naming the file (or the override) and the key.

    cfg = load_config("tiny", LatentDiffusionConfig, overrides=["unet.num_heads=2"])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from utils.errors import UserError
from utils.io import read_yaml

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
# Reading configs through OmegaConf.


def build_config(cls: type[T], sources: Iterable[tuple[str, Any]], overrides: Sequence[str] = ()) -> T:
    """Merge each ``(where, data)`` of ``sources`` onto ``cls``'s defaults, then the dotlist ``overrides``.

    ``data`` is a mapping (parsed YAML, a config dict stored in a checkpoint); ``where`` names it in
    errors. Returns the frozen dataclass.
    """
    cfg = OmegaConf.structured(cls)
    for where, data in sources:
        cfg = _merge(cfg, data, where)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"config override '{item}' must look like key.sub=value (e.g. unet.num_heads=4)")
        key, value = item.split("=", 1)
        cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key.strip()}={value}"]), f"config override '{item}'")
    return OmegaConf.to_object(cfg)


def _merge(cfg: DictConfig, data: Any, where: str) -> DictConfig:
    if not isinstance(data, (Mapping, DictConfig)):
        raise UserError(f"{where}: expected a mapping of config keys, got {data!r}")
    try:
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        if e.full_key is None:  # OmegaConf does not always say where: merge the entries one by one to find it
            for key, value in _leaves(data):
                try:
                    OmegaConf.merge(cfg, _nested(key, value))
                except OmegaConfBaseException as leaf_error:
                    raise _user_error(leaf_error, where, key) from None
        raise _user_error(e, where, e.full_key) from None


def _leaves(data: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, (Mapping, DictConfig)) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _nested(key: str, value: Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _user_error(e: OmegaConfBaseException, where: str, key: str | None) -> UserError:
    """One line: where, the key, and OmegaConf's reason (without its multi-line context)."""
    reason = str(e).splitlines()[0].replace("Value '$VALUE' of type '$VALUE_TYPE'", "an item")
    if isinstance(e, ConfigKeyError):
        return UserError(f"{where}: unknown key '{key}' ({reason})")
    return UserError(f"{where}: key '{key}': {reason}" if key else f"{where}: {reason}")


def from_dict(cls: type[T], data: Any, where: str = "config", overrides: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from plain data (a stored config dict), with validation and ``overrides``."""
    return build_config(cls, [(where, data)], overrides)


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain YAML/JSON-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:  # OmegaConf keeps tuple fields as tuples
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return plain(OmegaConf.to_container(OmegaConf.structured(cfg)))


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
        data = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not listed
        return False
    return isinstance(data, DictConfig) and ("base" in data or "unet" in data)


def preset_chain(name: str) -> list[tuple[str, dict]]:
    """``(file, data)`` of a preset and its ``base:`` ancestors (preset names or YAML paths), farthest first."""
    chain: list[tuple[str, dict]] = []
    path = preset_path(name)
    while True:
        if any(path.resolve() == Path(where).resolve() for where, _ in chain):
            raise UserError(f"{path}: circular 'base:' chain")
        data = read_yaml(path)
        base = data.pop("base", None)
        chain.append((str(path), data))
        if base is None:
            return chain[::-1]
        beside = path.parent / str(base)  # a base file path is relative to the file that names it
        path = preset_path(str(beside) if beside.suffix in (".yaml", ".yml") and beside.is_file() else str(base))


def load_config(name: str, cls: type[T], overrides: Sequence[str] = (), only_own_sections: bool = False) -> T:
    """Load preset/YAML ``name`` (with its ``base:`` chain and dotlist overrides) as dataclass ``cls``.

    ``only_own_sections`` keeps just the top-level keys that ``cls`` has, so the generic
    :class:`LatentDiffusionConfig` can be read from a preset that also configures a model built on it.
    """
    chain = preset_chain(name)
    if only_own_sections:
        own = set(cls.__dataclass_fields__)
        chain = [(where, {k: v for k, v in data.items() if k in own}) for where, data in chain]
    return build_config(cls, chain, overrides)
