"""Assembly of a starting VLMDiff checkpoint from Stable Diffusion 1.5 and a finetuned autoencoder.

The rule (ControlNet's): every ``control_model.X`` with a twin
``model.diffusion_model.X`` starts from it; ``first_stage_model.*`` comes from the finetuned
autoencoder; everything else SD has is copied; the rest (hint block, zero convolutions, SFF,
``logvar``) keeps its fresh initialisation. :func:`assemble_state_dict` is pure: it returns a new state
dict and checks that every target key is filled exactly once with the right shape.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ldm.checkpoint import drop_ema
from ldm.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.modules.text_encoder import canonical_clip_names
from utils.errors import UserError

log = logging.getLogger(__name__)

UNET = "model.diffusion_model."
CONTROL = "control_model."
FIRST_STAGE = "first_stage_model."
TEXT = "cond_stage_model."


@dataclass(frozen=True)
class Sources:
    """Where each target key came from (counts), for the log and the checkpoint's metadata."""

    counts: dict[str, int]

    def __str__(self) -> str:
        return ", ".join(f"{n} from {src}" for src, n in sorted(self.counts.items()))


def assemble_state_dict(
    target: Mapping[str, torch.Size],
    fresh: Mapping[str, torch.Tensor],
    sd: Mapping[str, torch.Tensor],
    ae: Mapping[str, torch.Tensor],
    *,
    text_from_sd: bool = True,
    sd_path: str = "SD checkpoint",
    ae_path: str = "autoencoder checkpoint",
) -> tuple[dict[str, torch.Tensor], Sources]:
    """Fill every key of ``target`` (name -> shape) from SD, the autoencoder or ``fresh``.

    ``sd``: Stable Diffusion weights (EMA already chosen or dropped); ``ae``: unprefixed autoencoder
    weights; ``fresh``: freshly initialised tensors for keys with no pretrained source (must cover at
    least the SG network's new layers and ``logvar``); ``text_from_sd``: take the CLIP weights from SD
    (False when the text encoder comes from elsewhere, then they must be in ``fresh``).
    Raises :class:`UserError` naming the first missing, unexpected, mis-shaped or non-finite key.
    """
    sd = canonical_clip_names(dict(sd)) if text_from_sd else dict(sd)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, shape in target.items():
        src, value = _source_of(key, sd, ae, fresh, text_from_sd, sd_path, ae_path)
        if tuple(value.shape) != tuple(shape):
            raise UserError(
                f"{src} does not fit the model: {key} has shape {tuple(value.shape)} there, the model needs "
                f"{tuple(shape)} (checkpoint for another model size? check --config)"
            )
        if value.is_floating_point() and not value.is_meta and not torch.isfinite(value).all():
            raise UserError(
                f"{src}: tensor {key} holds NaN or infinite values; the file is damaged (re-download or re-create it)"
            )
        out[key] = value.clone() if key.startswith(CONTROL) else value
        origin[key] = src
    unused = [k for k in sd if k not in out and not _ignored_sd_key(k, text_from_sd)]
    if unused:
        raise UserError(
            f"{sd_path} has weights this model does not use ({len(unused)}, e.g. {unused[0]}): "
            "is it a Stable Diffusion 1.x checkpoint for this config?"
        )
    unused_ae = sorted(set(ae) - {k[len(FIRST_STAGE) :] for k in out if k.startswith(FIRST_STAGE)})
    if unused_ae:
        raise UserError(
            f"{ae_path} has autoencoder weights this model does not use (e.g. {unused_ae[0]}): check --config"
        )
    return out, Sources(dict(Counter(origin.values())))


def _source_of(
    key: str,
    sd: Mapping[str, torch.Tensor],
    ae: Mapping[str, torch.Tensor],
    fresh: Mapping[str, torch.Tensor],
    text_from_sd: bool,
    sd_path: str,
    ae_path: str,
) -> tuple[str, torch.Tensor]:
    if key.startswith(FIRST_STAGE):
        k = key[len(FIRST_STAGE) :]
        if k not in ae:
            raise UserError(f"{ae_path} lacks autoencoder weight {k} (a checkpoint of another autoencoder?)")
        return ae_path, ae[k]
    if key.startswith(CONTROL):
        twin = UNET + key[len(CONTROL) :]
        if twin in sd:
            return f"{sd_path} (UNet twin)", sd[twin]
        return _fresh(key, fresh)
    if key.startswith(UNET) or (key.startswith(TEXT) and text_from_sd):
        if key not in sd:
            raise UserError(f"{sd_path} lacks {key}: not a complete Stable Diffusion 1.x checkpoint")
        return sd_path, sd[key]
    if key in SCHEDULE_BUFFERS and key in sd:
        return sd_path, sd[key]
    return _fresh(key, fresh)


def _fresh(key: str, fresh: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    if key not in fresh:
        raise UserError(f"no source for {key}: neither the checkpoints nor the fresh initialisation have it")
    return "fresh initialisation", fresh[key]


def _ignored_sd_key(key: str, text_from_sd: bool) -> bool:
    """SD keys that are expected to go unused: the replaced first stage, EMA copies, unused text weights."""
    return key.startswith((FIRST_STAGE, "model_ema.")) or (key.startswith(TEXT) and not text_from_sd)


# ---------------------------------------------------------------------------------------------
# Reading an assembled or trained VLMDiff checkpoint.

ARCH_SECTIONS = ("image_size", "unet", "autoencoder", "text_encoder", "diffusion", "control")
RUNTIME_KEYS = (
    "unet.use_checkpoint",
    "unet.attention",
    "unet.dropout",
    "autoencoder.dropout",
    "text_encoder.pretrained",
    "text_encoder.tokenizer",
    "image_size",
)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(a: Mapping, b: Mapping) -> str | None:
    """The first architecture setting in which two config dicts differ, as 'key: a vs b'."""
    fa, fb = _flatten(a), _flatten(b)
    for k in sorted(set(fa) | set(fb)):
        if k.startswith(RUNTIME_KEYS) or not k.startswith(ARCH_SECTIONS):
            continue
        if fa.get(k) != fb.get(k):
            return f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}"
    return None


def resolve_checkpoint_config(ckpt: Mapping, path: str, config: str | None, overrides: Sequence[str] = ()):
    """The model config for a checkpoint: its own (plus overrides), or ``config`` checked against it."""
    from ldm.config import from_dict, to_dict
    from vlmdiff.config import VLMDiffConfig, check_image_size, load_model_config

    stored = ckpt.get("config")
    if config is None:
        if stored is None:
            log.info("%s carries no config (an upstream checkpoint?): using the sd15 preset", path)
            cfg = load_model_config("sd15", overrides)
        else:
            cfg = from_dict(VLMDiffConfig, stored, f"{path} (stored config)", overrides)
            check_image_size(cfg, f"{path} with {' '.join(overrides)}" if overrides else path)
            _check_overrides_keep_architecture(to_dict(cfg), stored, path, overrides)
    else:
        cfg = load_model_config(config, overrides)
        if stored is not None:
            diff = config_difference(to_dict(cfg), stored)
            if diff:
                raise UserError(
                    f"{path} was built with another model config ({diff}); drop --config to use the "
                    "checkpoint's own, or pass the config it was built with"
                )
    return cfg


def _check_overrides_keep_architecture(cfg: Mapping, stored: Mapping, path: str, overrides: Sequence[str]) -> None:
    """A config override on a checkpoint may change how it runs, never a weight's shape: name the one that does."""
    diff = config_difference(cfg, stored) if overrides else None
    if diff is None:
        return
    now, before = _flatten(cfg), _flatten(stored)
    keys = {item: item.split("=", 1)[0].strip() for item in overrides}
    changing = [item for item, key in keys.items() if now.get(key) != before.get(key)] or list(overrides)
    raise UserError(
        f"the override {' '.join(changing)} changes the architecture {path} was built with ({diff}), so its "
        "weights cannot fit: drop the override (overrides that keep every weight's shape, such as "
        "unet.use_checkpoint=true, are fine)"
    )


# Entries of a Lightning checkpoint that only a resumed fit needs (Lightning reads them from the file itself).
TRAINING_STATE = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks")


def checkpoint_kind(keys: Iterable[str]) -> str:
    """What a state dict is, from its key names: VLMDiff, Stable Diffusion, autoencoder, or unknown."""
    keys = list(keys)
    if any(k.startswith(CONTROL) for k in keys):
        return "a VLMDiff checkpoint (it has control_model.* weights)"
    if any(k.startswith(UNET) for k in keys):
        return "a Stable Diffusion checkpoint (model.diffusion_model.* without control_model.*)"
    if any(k.startswith(("encoder.", "decoder.", FIRST_STAGE)) for k in keys):
        return "an autoencoder checkpoint (no UNet weights)"
    return f"not a checkpoint this project knows (first key: {keys[0] if keys else 'none'})"


def load_vlmdiff(
    path: str | os.PathLike,
    config: str | None = None,
    overrides: Sequence[str] = (),
    allow_unsafe_pickle: bool = False,
    **model_kwargs,
):
    """Build a VLMDiff model from a checkpoint (assembled, trained, or upstream's) without a second copy.

    The file is memory-mapped and the network, created on the meta device, takes its tensors directly
    (half-precision files are cast to float32); only the text encoder is built on the CPU first (its
    tokenizer and non-persistent buffers). Returns ``(model, info)``: ``info`` is the checkpoint without
    its weights and training state (optimiser, loops), which are released here, and with the digest of
    the file's weights under ``DIGEST_KEY`` (:func:`ldm.checkpoint.checkpoint_digest`: what identifies
    the checkpoint in a test run's manifest).
    """
    from ldm.checkpoint import DIGEST_KEY, checkpoint_digest, load_checkpoint, state_dict_of
    from ldm.modules.text_encoder import build_text_encoder
    from vlmdiff.model import VLMDiff

    ckpt = load_checkpoint(path, allow_unsafe_pickle)
    sd = drop_ema(state_dict_of(ckpt, path))
    if not any(k.startswith(CONTROL) for k in sd):
        raise UserError(
            f"{path} is {checkpoint_kind(sd)}, not a VLMDiff checkpoint: assemble one with "
            "build_model.py (Stable Diffusion + autoencoder) or give a trained ckpt_*/last.ckpt"
        )
    cfg = resolve_checkpoint_config(ckpt, str(path), config, overrides)
    info = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    info[DIGEST_KEY] = checkpoint_digest(ckpt, path)
    del ckpt  # the optimiser state of a trained checkpoint is not kept alive by the caller
    text = build_text_encoder(cfg.text_encoder, load_pretrained=False)
    with torch.device("meta"):
        model = VLMDiff(cfg, text_encoder=text, **model_kwargs)
    model.load_weights(sd, str(path), hint="is it a VLMDiff checkpoint of this config?", assign=True)
    return model, info
