"""Reading and writing checkpoints in the formats the latent-diffusion world uses.

* ``.ckpt`` / ``.pt`` / ``.pth``: a torch pickle, usually a dict with a ``state_dict``. Loaded with
  ``weights_only=True`` and, for the zip format torch has written since 1.6, ``mmap=True``: tensors stay
  in the file until read, so entries a stage does not use (EMA copies, optimiser state) cost no memory.
  Lightning 1.x checkpoints (upstream's) also pickle Lightning and OmegaConf objects; those classes
  are mapped to an inert placeholder so the file loads without running their code. Arbitrary pickles
  load only with ``allow_unsafe_pickle=True`` (trusted files only).
* ``.safetensors``: tensors plus string metadata (ours stores the resolved config there); read lazily
  (``safe_open`` maps the file) and written by streaming the tensors into the temporary file.
* Half-precision files (``*-fp16``, bf16) load into a float32 model: :func:`load_into` casts (and logs).
* Stable Diffusion's EMA copy ``model_ema.<name without dots>`` can replace the raw UNet weights.
* Identity by content: every checkpoint this project writes stores :func:`weights_digest` of its
  weights (a top-level ``weights_sha256`` entry of a ``.ckpt``, a metadata entry of a ``.safetensors``),
  so it can be told from another file of the same name and size without reading its weights
  (:func:`stored_digest`); :func:`checkpoint_digest` gives the digest of any loaded checkpoint and
  checks a stored one against its weights.
* Lightning's checkpoint IO through the same atomic writes (and the digest) is
  :class:`ldm.checkpoint_io.AtomicCheckpointIO`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.errors import UserError
from utils.io import atomic_open, atomic_path

log = logging.getLogger(__name__)

DIGEST_KEY = "weights_sha256"  # the stored digest: a top-level checkpoint entry, a safetensors metadata key

# Globals of these packages may appear in Lightning 1.x / OmegaConf pickles beside the weights. They
# are replaced by an inert placeholder: the data loads, no code of theirs runs.
OPAQUE_GLOBAL_PREFIXES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "omegaconf.",
    "typing.",
    "argparse.",
    "pathlib.",
    "numpy.",
    "_codecs.",
    "collections.",
    "builtins.",
)


class OpaqueObject:
    """Stands in for an unpickled object of a class we do not import (hyper-parameters, callbacks)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:
        return OpaqueObject(*args)

    def __repr__(self) -> str:
        return "OpaqueObject()"


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give a .ckpt, .pt, .pth or .safetensors file")


def load_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    """Load a checkpoint file into a dict (for safetensors: ``{"state_dict": ..., "metadata": ...}``)."""
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if allow_unsafe_pickle:
            log.warning("loading %s as an arbitrary pickle (allow_unsafe_pickle): only do this for trusted files", path)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            obj = _load_with_opaque_globals(path, e, mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise UserError(f"{path} is not a readable checkpoint ({_short(e)}); is the file complete?") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _short(e: BaseException) -> str:
    """The first sentence of the first line of an exception's message (torch's go on with advice), at most 200 chars."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(e).__name__


def _load_with_opaque_globals(path: Path, first_error: Exception, mmap: bool) -> Any:
    """weights_only load with the Lightning/OmegaConf globals of the file mapped to :class:`OpaqueObject`."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a torch zip checkpoint
        raise UserError(f"{path} is not a readable checkpoint ({_short(first_error)})") from e
    unknown = [n for n in names if not n.startswith(OPAQUE_GLOBAL_PREFIXES)]
    if unknown:
        raise UserError(
            f"{path} contains pickled code objects ({', '.join(unknown[:3])}); it may run code when loaded. "
            "If you trust the file, pass --unsafe_legacy_pickle"
        )
    with torch.serialization.safe_globals([(OpaqueObject, n) for n in names]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"{path} could not be read safely ({_short(e)}); if you trust it, pass --unsafe_legacy_pickle"
            ) from e


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # Each tensor is copied into its own allocation: inside the file tensors are only 8-byte aligned,
            # and CPU kernels round differently on unaligned memory (maps would differ in the last bits
            # from those of the same weights loaded from a .ckpt).
            sd = {k: f.get_tensor(k).clone() for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({_short(e)})") from e
    out: dict[str, Any] = {"state_dict": sd, "metadata": meta}
    if DIGEST_KEY in meta:
        out[DIGEST_KEY] = meta[DIGEST_KEY]
    if "config" in meta:
        out["config"] = json.loads(meta["config"])
    return out


def state_dict_of(ckpt: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint: its ``state_dict`` entry, or the dict itself if it is one."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping):
        raise UserError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping of tensors")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors: not a model checkpoint")
    return tensors


def load_state_dict(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    return state_dict_of(load_checkpoint(path, allow_unsafe_pickle), path)


def ema_key(key: str) -> str:
    """``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab`` (LitEma's naming)."""
    return "model_ema." + "".join(key.split(".")[1:])


def use_ema_weights(
    sd: Mapping[str, torch.Tensor], prefix: str = "model.diffusion_model.", path: str | os.PathLike = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Replace every ``prefix*`` weight by its EMA copy and drop the ``model_ema.*`` entries."""
    out = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    targets = [k for k in out if k.startswith(prefix)]
    missing = [k for k in targets if ema_key(k) not in sd]
    if not targets or missing:
        raise UserError(
            f"{path}: no EMA weights for {missing[0] if missing else prefix + '*'} "
            "(the file has no model_ema.* copy; drop the EMA option or use v1-5-pruned.ckpt)"
        )
    for k in targets:
        out[k] = sd[ema_key(k)]
    return out


def drop_ema(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("model_ema.")}


def describe_mismatch(
    expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], ignore: Iterable[str] = ()
) -> str | None:
    """One readable summary of missing, unexpected and mis-shaped keys; None when all match."""
    ignore = set(ignore)
    missing = sorted(k for k in expected if k not in given and k not in ignore)
    unexpected = sorted(k for k in given if k not in expected and k not in ignore)
    shapes = sorted(k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} with another shape (e.g. {k}: file {tuple(given[k].shape)}, model {tuple(expected[k])})"
        )
    return "; ".join(parts) or None


def load_into(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike = "checkpoint",
    ignore: Iterable[str] = (),
    hint: str = "",
    assign: bool = False,
) -> None:
    """Load ``sd`` strictly into ``module``: every key present, none extra, every shape equal.

    On any mismatch one :class:`UserError` summarises all of them (with an example of each kind).
    ``assign`` makes the module use the given tensors (for modules built on the meta device).
    """
    own = module.state_dict()
    expected = {k: v.shape for k, v in own.items()}
    problem = describe_mismatch(expected, sd, ignore)
    if problem:
        raise UserError(f"{path} does not fit this model: {problem}{'; ' + hint if hint else ''}")
    sd = cast_to_model_dtypes(sd, {k: v.dtype for k, v in own.items()}, path)
    missing, unexpected = module.load_state_dict(
        {k: v for k, v in sd.items() if k in expected}, strict=False, assign=assign
    )
    missing = [k for k in missing if k not in set(ignore)]
    if missing or unexpected:  # only reachable if a load hook renamed keys inconsistently
        raise UserError(f"{path} does not fit this model: missing {missing[:1]}, unexpected {unexpected[:1]}")
    bad = [k for k, v in sd.items() if k in expected and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(
            f"{path}: tensor {bad[0]} holds NaN or infinite values ({len(bad)} such tensors); the file is damaged"
        )


def cast_to_model_dtypes(
    sd: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], path: str | os.PathLike = "checkpoint"
) -> dict[str, torch.Tensor]:
    """``sd`` with every floating tensor in the dtype the model has for it (float16/bf16 files -> float32).

    Logs what was cast; tensors already in the model's dtype (or not in ``dtypes``) are returned as they are.
    """
    out = dict(sd)
    cast: Counter = Counter()
    for k, v in sd.items():
        want = dtypes.get(k)
        if want is not None and v.is_floating_point() and want.is_floating_point and v.dtype != want:
            out[k] = v.to(want)
            cast[(str(v.dtype).removeprefix("torch."), str(want).removeprefix("torch."))] += 1
    for (src, dst), n in sorted(cast.items()):
        log.info("%s: %d tensors stored as %s, cast to %s (the model's dtype)", path, n, src, dst)
    return out


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write weights (+ the resolved config) atomically as ``.safetensors`` or a torch ``.ckpt`` dict.

    Either format stores :func:`weights_digest` of the weights (:data:`DIGEST_KEY`). safetensors files
    are written straight to a temporary file beside ``path`` (no second copy of the weights in memory),
    then renamed; the config and ``extra`` go into the metadata as JSON strings.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        meta = {"config": json.dumps(config)} if config is not None else {}
        meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
        meta[DIGEST_KEY] = weights_digest(tensors)
        with atomic_path(path) as tmp:
            try:
                save_file(_unshare(tensors), str(tmp), metadata=meta)  # streams each tensor to the file
            except SafetensorError as e:  # its I/O errors (a full disk) are not OSErrors
                raise OSError(str(e)) from e
        return
    obj: dict[str, Any] = {"state_dict": dict(state_dict)}
    if config is not None:
        obj["config"] = dict(config)
    obj.update(extra or {})
    obj[DIGEST_KEY] = weights_digest(obj["state_dict"])
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage: clone the later ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


# ---------------------------------------------------------------------------------------------
# Identity by content


def weights_digest(state_dict: Mapping[str, Any]) -> str:
    """sha256 (64 hex digits) of a state dict's tensors: name, dtype, shape and bytes of each, in name order.

    Every tensor entry counts (EMA copies and buffers too); non-tensor entries are skipped. Two files
    with the same weights have the same digest whatever their format (``.ckpt`` or ``.safetensors``).
    About 1 GB/s on one CPU core (SHA-NI): seconds for a Stable-Diffusion-size model.
    """
    h = hashlib.sha256()
    for name in sorted(k for k, v in state_dict.items() if isinstance(v, torch.Tensor)):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def checkpoint_digest(ckpt: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> str:
    """The :func:`weights_digest` of a loaded checkpoint's weights (computed: they are read anyway).

    A stored digest that differs from the weights (a file edited after it was written) is logged and
    the weights' own digest is returned: the identity is always that of the weights.
    """
    digest = weights_digest(state_dict_of(ckpt, path))
    stored = ckpt.get(DIGEST_KEY)
    if stored is not None and stored != digest:
        log.warning(
            "%s: its weights are not the ones it was written with (stored digest %s, weights %s): the file "
            "was changed afterwards; it is identified by its weights",
            path,
            str(stored)[:12],
            digest[:12],
        )
    return digest


def stored_digest(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> str | None:
    """The digest stored in a checkpoint file when it was written, without reading its weights; None if none.

    safetensors: read from the header; ``.ckpt``: the file is memory-mapped, so only its index is read.
    """
    path = Path(path)
    _check_exists(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return (f.metadata() or {}).get(DIGEST_KEY)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({_short(e)})") from e
    value = load_checkpoint(path, allow_unsafe_pickle).get(DIGEST_KEY)
    return value if isinstance(value, str) else None


def file_digest(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> str:
    """A checkpoint file's weights digest: the stored one, else computed from its weights (a full read)."""
    stored = stored_digest(path, allow_unsafe_pickle)
    if stored is not None:
        return stored
    log.info("%s stores no weights digest (written elsewhere): computing it from its weights", path)
    return checkpoint_digest(load_checkpoint(path, allow_unsafe_pickle), path)
