"""Frozen caption encoders whose last hidden state feeds the UNet's cross-attention.

``clip``: the CLIP text tower of Stable Diffusion (transformers ``CLIPTextModel``). SD-1.5 checkpoints
name its weights as transformers 4.19 did (``transformer.text_model.*`` with a persistent
``position_ids`` buffer); newer transformers releases drop the ``text_model.`` level and make
``position_ids`` non-persistent. This wrapper always writes the SD-1.5 names and reads either.
Its tokenizer cleans each caption as SD-1.5's did (transformers' slow ``CLIPTokenizer`` with ``ftfy``
installed): ``ftfy.fix_text`` (typographic quotes, ligatures, HTML entities), runs of whitespace to one
space, strip, lower case; then CLIP's BPE. The tokenizers-backed ``CLIPTokenizer`` of transformers 5
skips ``ftfy``, so without this step such captions got other token ids.
``hf``: any transformers text model (``AutoModel`` + ``AutoTokenizer``), e.g. a sentence encoder.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.config import TextEncoderConfig
from utils.errors import UserError
from utils.io import write_text

log = logging.getLogger(__name__)

SD_CLIP_PREFIX = "text_model."  # the nesting level of transformers < 5 inside CLIPTextModel
MIN_VOCAB = 100  # an offline hub lookup yields a near-empty tokenizer; anything this small is an error


class TextEncoder(nn.Module):
    """``forward(texts) -> (B, max_length, D)``: tokenise (pad to max length, truncate), encode, frozen."""

    def __init__(self, transformer: nn.Module, tokenizer: Any, max_length: int, kind: str):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.kind = kind
        self.transformer.eval()
        self.transformer.requires_grad_(False)
        if kind == "clip":
            self._native_has_text_model = any(k.startswith(SD_CLIP_PREFIX) for k in transformer.state_dict())
            self.register_state_dict_post_hook(_clip_to_sd_names)
            self.register_load_state_dict_pre_hook(_clip_from_sd_names)

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        self.transformer.eval()  # frozen: never in training mode (no dropout)
        return self

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [sd_clip_clean(t) for t in texts] if self.kind == "clip" else list(texts)
        enc = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.transformer.parameters()).device
        enc = self.tokenize(texts)
        if self.kind == "clip":  # SD feeds CLIP the padded ids without an attention mask
            out = self.transformer(input_ids=enc["input_ids"].to(device))
        else:
            out = self.transformer(**{k: v.to(device) for k, v in enc.items()})
        return out.last_hidden_state  # (B, L, D)


def sd_clip_clean(text: str) -> str:
    """SD-1.5's caption clean-up before CLIP BPE: ``ftfy.fix_text``, whitespace runs to one space, strip, lower."""
    import ftfy

    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def _clip_to_sd_names(module: TextEncoder, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: installed transformers names -> SD-1.5 names (+ persistent position_ids)."""
    tprefix = prefix + "transformer."
    keys = [k for k in state_dict if k.startswith(tprefix)]
    if not module._native_has_text_model:
        for k in keys:
            state_dict[tprefix + SD_CLIP_PREFIX + k[len(tprefix) :]] = state_dict.pop(k)
    pos_key = tprefix + SD_CLIP_PREFIX + "embeddings.position_ids"
    if pos_key not in state_dict:
        emb = module.transformer.get_input_embeddings()
        n = module.transformer.config.max_position_embeddings
        state_dict[pos_key] = torch.arange(n, device=emb.weight.device).unsqueeze(0)


def _clip_from_sd_names(module: TextEncoder, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: accept SD-1.5 names or the installed transformers names; drop position_ids."""
    tprefix = prefix + "transformer."
    native_pos = any(
        n.endswith("embeddings.position_ids")
        for n, _ in module.transformer.named_buffers()
        if _is_persistent(module.transformer, n)
    )
    for k in [k for k in state_dict if k.startswith(tprefix)]:
        rest = k[len(tprefix) :]
        if rest.endswith("embeddings.position_ids") and not native_pos:
            pos = state_dict.pop(k)
            expected = torch.arange(pos.shape[-1])
            if pos.device.type != "meta" and not torch.equal(pos.reshape(-1).long().cpu(), expected):
                log.warning("checkpoint's CLIP position_ids are not 0..%d; using the standard ones", pos.shape[-1] - 1)
            continue
        has = rest.startswith(SD_CLIP_PREFIX)
        if has and not module._native_has_text_model:
            state_dict[tprefix + rest[len(SD_CLIP_PREFIX) :]] = state_dict.pop(k)
        elif not has and module._native_has_text_model:
            state_dict[tprefix + SD_CLIP_PREFIX + rest] = state_dict.pop(k)


def canonical_clip_names(sd: dict[str, torch.Tensor], prefix: str = "cond_stage_model.") -> dict[str, torch.Tensor]:
    """Rename CLIP weights under ``prefix`` to SD-1.5 names (``transformer.text_model.*``, with position_ids)."""
    tprefix = prefix + "transformer."
    out = {}
    for k, v in sd.items():
        if k.startswith(tprefix) and not k[len(tprefix) :].startswith(SD_CLIP_PREFIX):
            k = tprefix + SD_CLIP_PREFIX + k[len(tprefix) :]
        out[k] = v
    emb = out.get(tprefix + SD_CLIP_PREFIX + "embeddings.position_embedding.weight")
    pos_key = tprefix + SD_CLIP_PREFIX + "embeddings.position_ids"
    if emb is not None and pos_key not in out:
        out[pos_key] = torch.arange(emb.shape[0]).unsqueeze(0)
    return out


def _is_persistent(model: nn.Module, buffer_name: str) -> bool:
    owner_name, _, leaf = buffer_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf not in owner._non_persistent_buffers_set


def clip_bpe_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write vocab.json / merges.txt of the CLIP BPE tokenizer from open_clip's bundled vocabulary.

    The files equal openai/clip-vit-large-patch14's (the same BPE file generated both), so
    ``CLIPTokenizer.from_pretrained`` on this folder gives SD's token ids with no download.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = (
        Path(cache_dir)
        if cache_dir
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmdiff" / "clip_tokenizer"
    )
    if (
        (folder / "vocab.json").is_file()
        and (folder / "merges.txt").is_file()
        and (folder / "tokenizer_config.json").is_file()
    ):
        return folder
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    files = {
        "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
            }
        ),
    }
    for name, text in files.items():  # atomic per file: concurrent processes may race here
        try:
            write_text(folder / name, text)
        except UserError as e:
            raise UserError(f"{e}; the tokenizer cache needs a writable folder: set XDG_CACHE_HOME to one") from e
    return folder


def _load_tokenizer(kind: str, source: str) -> Any:
    from transformers import AutoTokenizer, CLIPTokenizer

    if kind == "clip" and source == "bundled":
        source = str(clip_bpe_tokenizer_dir())
    source = resolve_source(source)
    try:
        tok = CLIPTokenizer.from_pretrained(source) if kind == "clip" else AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"text_encoder tokenizer '{source}': cannot load ({e}); give a local folder") from e
    if len(tok) < MIN_VOCAB:
        raise UserError(
            f"text_encoder tokenizer '{source}' loaded with only {len(tok)} tokens (a hub id without network?); "
            "give a local folder with the tokenizer files"
        )
    return tok


def build_text_encoder(cfg: TextEncoderConfig, load_pretrained: bool = True) -> TextEncoder:
    """Build the caption encoder of ``cfg``; pretrained weights are read only if ``load_pretrained``.

    Inside a ``torch.device("meta")`` context with ``load_pretrained=False`` nothing is allocated.
    """
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel

    if cfg.kind == "clip":
        if cfg.pretrained and load_pretrained:
            transformer = _from_pretrained(CLIPTextModel, cfg.pretrained)
        else:
            a = cfg.clip_arch
            hf_cfg = CLIPTextConfig(
                vocab_size=a.vocab_size,
                hidden_size=a.hidden_size,
                intermediate_size=a.intermediate_size,
                num_hidden_layers=a.num_hidden_layers,
                num_attention_heads=a.num_attention_heads,
                max_position_embeddings=a.max_position_embeddings,
                hidden_act=a.hidden_act,
                layer_norm_eps=a.layer_norm_eps,
                **_clip_special_ids(a.vocab_size),
            )
            transformer = CLIPTextModel(hf_cfg)
        tokenizer = _load_tokenizer("clip", cfg.tokenizer if cfg.tokenizer else "bundled")
    elif cfg.kind == "hf":
        if not cfg.pretrained:
            raise UserError("text_encoder.kind 'hf' needs text_encoder.pretrained: a transformers folder or hub id")
        if load_pretrained:
            transformer = _from_pretrained(AutoModel, cfg.pretrained)
        else:
            transformer = AutoModel.from_config(AutoConfig.from_pretrained(resolve_source(cfg.pretrained)))
        tok_source = cfg.pretrained if cfg.tokenizer in ("bundled", "") else cfg.tokenizer
        tokenizer = _load_tokenizer("hf", tok_source)
    else:
        raise UserError(f"text_encoder.kind must be 'clip' or 'hf', got '{cfg.kind}'")
    return TextEncoder(transformer, tokenizer, cfg.max_length, cfg.kind)


def _clip_special_ids(vocab_size: int) -> dict[str, int]:
    """CLIP's begin/end/pad ids when the vocabulary is CLIP's; small placeholders otherwise."""
    if vocab_size > 49407:
        return {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    return {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def resolve_source(source: str) -> str:
    """``pkg:<package>/<sub/folder>`` names a folder shipped inside an installed Python package."""
    if not source.startswith("pkg:"):
        return source
    import importlib.util

    package, _, sub = source[4:].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"text encoder source '{source}': package '{package}' is not installed "
            f"(pip install {package.replace('_', '-')})"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def _from_pretrained(cls: Any, source: str) -> nn.Module:
    source = resolve_source(source)
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"text_encoder.pretrained '{source}': cannot load ({e}); give a local folder") from e
