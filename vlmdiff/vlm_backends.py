"""Vision-language captioners, each run the way the paper's captions were made.

- ``internvl``: InternVL2-8B through its own remote code (``trust_remote_code``), bf16, dynamic 448 px
  tiling (up to 12 tiles plus a thumbnail), ``model.chat`` with greedy decoding and up to 1024 new tokens.
- ``blip``: BLIP-2 FlanT5-XXL (``Blip2ForConditionalGeneration``) decoding with LAVIS's ``blip2_t5``
  ``generate`` defaults: 5 beams, at most 30 new tokens, min length 1.
- ``deepseekvl``: DeepSeek-VL-1.3B-chat through LMDeploy with upstream's prompt layout
  ``f"{prompt} {IMAGE_TOKEN}"``, greedy.
- ``hf``: any image-text-to-text model ``transformers`` loads natively (chat template when the processor
  has one, greedy). ``llava`` is LLaVA-NeXT Llama-3-8B in this backend (256 new tokens).

:data:`BACKENDS` is the one table of backends (``captioner.py --backend`` offers its names): a new
backend is its class here (InternVL2's: in ``vlmdiff.internvl``) plus one entry there.

Every model is found before anything is loaded: a local folder, or a complete snapshot in the Hugging
Face cache; a hub id that is neither is fetched only when the hub answers (offline: one clear error at
once instead of minutes of retries).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from PIL import Image

from utils.errors import UserError

if TYPE_CHECKING:  # torch is imported when a model backend is built: the captioner's --help needs none
    import torch

logger = logging.getLogger(__name__)

Backend = Callable[[Sequence[Image.Image], Sequence[str]], list[str]]

DEEPSEEK_IMAGE_TOKEN = "<IMAGE_TOKEN>"  # lmdeploy.vl.constants.IMAGE_TOKEN
# LAVIS Blip2T5.generate defaults; LAVIS passes its max_length to transformers as max_new_tokens
BLIP2_GENERATE: Mapping[str, Any] = MappingProxyType(
    {
        "do_sample": False,
        "num_beams": 5,
        "max_new_tokens": 30,
        "min_length": 1,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "num_return_sequences": 1,  # (top_p 0.9, temperature 1: unused without sampling)
    }
)


@dataclass(frozen=True)
class KnownVLM:
    """A captioner of the paper (or offered beside them): short name, checkpoint, backend, decoding budget."""

    name: str
    model_id: str
    backend: str
    max_new_tokens: int


KNOWN_VLMS: Mapping[str, KnownVLM] = MappingProxyType(
    {
        v.name: v
        for v in (
            KnownVLM("internvl", "OpenGVLab/InternVL2-8B", "internvl", 1024),
            KnownVLM("blip", "Salesforce/blip2-flan-t5-xxl", "blip", 30),
            KnownVLM("deepseekvl", "deepseek-ai/deepseek-vl-1.3b-chat", "deepseekvl", 512),  # LMDeploy's default budget
            # the transformers conversion of lmms-lab/llama3-llava-next-8b (the original needs the LLaVA-NeXT code)
            KnownVLM("llava", "llava-hf/llama3-llava-next-8b-hf", "hf", 256),
        )
    }
)
ALIASES: Mapping[str, str] = MappingProxyType({"deepseek": "deepseekvl", "lmms-lab/llama3-llava-next-8b": "llava"})


def known_vlm(model: str) -> KnownVLM | None:
    """The known captioner ``model`` names: its short name, its hub id, or a local folder named like the hub id."""
    key = ALIASES.get(model.lower(), model.lower())
    if key in KNOWN_VLMS:
        return KNOWN_VLMS[key]
    base = Path(model.rstrip("/")).name.lower()
    for vlm in KNOWN_VLMS.values():
        if key == vlm.model_id.lower() or base == vlm.model_id.split("/")[-1].lower():
            return vlm
    return None


def default_backend(model: str) -> str:
    """``template`` for ``--vlm_model template``, the upstream backend of a known captioner, else ``hf``."""
    if model == "template":
        return "template"
    vlm = known_vlm(model)
    return vlm.backend if vlm else "hf"


def model_source(model: str) -> str:
    """The hub id or folder behind ``--vlm_model`` (short names expand to their checkpoints)."""
    key = ALIASES.get(model.lower(), model.lower())
    return KNOWN_VLMS[key].model_id if key in KNOWN_VLMS else model


# ---------------------------------------------------------------- finding the files


def resolve_model(model: str) -> str:
    """A local folder or cached snapshot of ``model`` (a hub id is returned as is when the hub answers).

    Raises a one-line UserError within seconds when the files are nowhere to be had.
    """
    import huggingface_hub
    from huggingface_hub import constants, errors

    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not an owner/name hub id
        raise UserError(
            f"--vlm_model {model}: no such model folder; give the folder holding the model's "
            "config.json and weights, or a hub id such as OpenGVLab/InternVL2-8B"
        )
    try:
        return huggingface_hub.snapshot_download(model, local_files_only=True)
    except errors.HFValidationError as e:
        raise UserError(f"--vlm_model {model!r} is neither a local folder nor a valid hub id ({e})") from e
    except (errors.LocalEntryNotFoundError, FileNotFoundError):
        pass
    where = (
        f"put its files in a folder and pass --vlm_model FOLDER, or download {model} into the Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}, e.g. `hf download {model}` where there is network)"
    )
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--vlm_model {model} is not on disk and the hub is offline (HF_HUB_OFFLINE): {where}")
    try:
        huggingface_hub.HfApi().model_info(model, timeout=10)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise UserError(f"--vlm_model {model}: the hub has no such (accessible) model; check the id or log in") from e
    except Exception as e:  # no network: DNS, refused connection or timeout, whatever the HTTP client calls it
        raise UserError(
            f"--vlm_model {model} is not on disk and the hub cannot be reached ({type(e).__name__}): {where}"
        ) from e
    return model


def device_and_dtype(device: str, dtype: str, default_dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``auto`` device: CUDA when present; ``auto`` dtype: ``default_dtype``, else float32 on CPU, bf16/fp16 on GPU."""
    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        dtype = default_dtype or (
            "float32" if dev.type == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        )
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"unknown --dtype {dtype!r}; valid: auto, float32, float16, bfloat16")
    return dev, getattr(torch, dtype)


# ---------------------------------------------------------------- DeepSeek-VL (LMDeploy)


class DeepSeekVLBackend:
    """DeepSeek-VL through an LMDeploy pipeline: ``(f"{prompt} {IMAGE_TOKEN}", image)``, greedy."""

    def __init__(self, model: str, prompt: str, max_new_tokens: int = 512) -> None:
        try:
            import lmdeploy
            from lmdeploy.vl.constants import IMAGE_TOKEN
        except ImportError as e:
            raise UserError(
                "--backend deepseekvl runs DeepSeek-VL through LMDeploy as upstream did: pip install "
                "lmdeploy (CUDA only), or caption with a transformers checkpoint and --backend hf, "
                "e.g. --vlm_model deepseek-community/deepseek-vl-1.3b-chat"
            ) from e
        source = resolve_model(model_source(model))
        self.pipe = lmdeploy.pipeline(source)
        accepted = inspect.signature(lmdeploy.GenerationConfig).parameters
        greedy = {"max_new_tokens": int(max_new_tokens), "top_k": 1, "do_sample": False}  # do_sample: lmdeploy>=0.6
        self.gen_config = lmdeploy.GenerationConfig(**{k: v for k, v in greedy.items() if k in accepted})
        self.text = f"{prompt} {IMAGE_TOKEN}"
        logger.info("captioning with DeepSeek-VL %s through LMDeploy", source)

    def __call__(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[str]:
        responses = self.pipe([(self.text, im) for im in images], gen_config=self.gen_config)
        return [r.text.strip() for r in responses]


# ---------------------------------------------------------------- transformers-native models (BLIP-2, LLaVA-NeXT, any)


class HFBackend:
    """Any ``transformers`` image-text-to-text model: processor + ``generate(**generate_kwargs)``.

    With ``chat`` the prompt goes through the processor's chat template when it has one; decoding is
    greedy unless ``generate_kwargs`` says otherwise.
    """

    def __init__(
        self,
        model: str,
        prompt: str,
        dtype: str = "auto",
        device: str = "auto",
        max_new_tokens: int = 1024,
        generate_kwargs: Mapping[str, Any] | None = None,
        chat: bool = True,
    ) -> None:
        import transformers
        from transformers import AutoProcessor

        self.device, self.dtype = device_and_dtype(device, dtype)
        source = resolve_model(model_source(model))
        classes = [
            getattr(transformers, n)
            for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
            if hasattr(transformers, n)
        ]
        try:
            self.processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load the processor of --vlm_model {source!r} ({e}); pass a local model folder "
                "or download the model first"
            ) from e
        errors = []
        for cls in classes:
            try:
                self.model = cls.from_pretrained(source, dtype=self.dtype)
                break
            except (OSError, ValueError, KeyError) as e:
                errors.append(f"{cls.__name__}: {e}")
        else:
            raise UserError(f"cannot load --vlm_model {source!r} as an image-text-to-text model ({'; '.join(errors)})")
        self.model.to(self.device).eval()
        self.generate_kwargs = (
            dict(generate_kwargs)
            if generate_kwargs is not None
            else {"do_sample": False, "num_beams": 1, "max_new_tokens": int(max_new_tokens)}
        )
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched decoder-only generation needs left padding
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
        self.text = prompt
        if chat and getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        logger.info("captioning with %s (%s) on %s, %s", source, type(self.model).__name__, self.device, self.dtype)

    def _inputs(self, images: Sequence[Image.Image]) -> dict:
        import torch

        texts = [self.text] * len(images)
        try:
            inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        except (ValueError, TypeError):  # processors that want one list of images per text
            inputs = self.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def __call__(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> list[str]:
        import torch

        inputs = self._inputs(images)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs)
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids):
            out = out[:, ids.shape[1] :]  # decoder-only models return prompt + new tokens
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def _internvl(model: str, prompt: str, dtype: str, device: str, budget: int | None, prompt_type: str) -> Backend:
    from vlmdiff.internvl import InternVLBackend

    return InternVLBackend(model, prompt, dtype, device, budget or KNOWN_VLMS["internvl"].max_new_tokens)


def _blip(model: str, prompt: str, dtype: str, device: str, budget: int | None, prompt_type: str) -> Backend:
    # LAVIS sends the prompt as is (no chat template) and decodes with beam search
    generate = {**BLIP2_GENERATE, "max_new_tokens": budget or BLIP2_GENERATE["max_new_tokens"]}
    return HFBackend(model, prompt, dtype, device, generate_kwargs=generate, chat=False)


def _deepseekvl(model: str, prompt: str, dtype: str, device: str, budget: int | None, prompt_type: str) -> Backend:
    return DeepSeekVLBackend(model, prompt, budget or KNOWN_VLMS["deepseekvl"].max_new_tokens)


def _hf(model: str, prompt: str, dtype: str, device: str, budget: int | None, prompt_type: str) -> Backend:
    return HFBackend(model, prompt, dtype, device, budget or 1024)


def _template(model: str, prompt: str, dtype: str, device: str, budget: int | None, prompt_type: str) -> Backend:
    from vlmdiff.captioning import TemplateBackend

    return TemplateBackend(prompt_type)


# The backends: name -> builder(model, prompt, dtype, device, max_new_tokens or None, prompt_type).
BACKENDS: Mapping[str, Callable[..., Backend]] = MappingProxyType(
    {"hf": _hf, "internvl": _internvl, "blip": _blip, "deepseekvl": _deepseekvl, "template": _template}
)


def build_backend(
    backend: str,
    model: str,
    prompt: str,
    dtype: str = "auto",
    device: str = "auto",
    max_new_tokens: int | None = None,
    prompt_type: str = "pd",
) -> Backend:
    """The captioner ``backend`` (a name of :data:`BACKENDS`) for ``model``; ``max_new_tokens`` None = the
    model's upstream budget. ``prompt_type`` is what the offline ``template`` backend describes by."""
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; valid: {', '.join(BACKENDS)}")
    vlm = known_vlm(model)
    budget = max_new_tokens or (vlm.max_new_tokens if vlm and vlm.backend == backend else None)
    return BACKENDS[backend](model, prompt, dtype, device, budget, prompt_type)
