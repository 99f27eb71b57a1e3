"""On-disk store of per-image anomaly maps: crash-safe, resumable, read back one class at a time.

Layout: ``{root}/{safe class name}/{chunk_name}.npz``, one file per (batch, class), each written
atomically (temporary file + rename), so a crash leaves whole chunks only. A chunk holds

* ``ids`` [n] str: stable image ids (e.g. the path relative to the dataset root),
* ``class_name`` [] str: the original class name,
* ``maps`` [n, H, W] float32 (default) or float16,
* ``masks`` [n, H, W] uint8 0..255 (ground truth at map resolution),
* ``labels`` [n] int8 (0 normal, 1 anomalous, as the dataset says),
* ``image_scores`` [n] float64,
* ``image_sizes`` [n] int64, ``mask_sha256`` [n] str and ``image_sha256`` [n] str: the identity of each
  image's source files when its map was made (:class:`SourceFiles`: image file size in bytes, 16 hex
  digits of the mask file's sha256 ("" without a mask) and of the image file's). Chunks of older
  versions lack these arrays, or only ``image_sha256``.

Class folder names: every character outside ``[A-Za-z0-9_-]`` (including ``.`` and ``%``) is
replaced by ``%XX`` per UTF-8 byte, so the mapping is reversible and no name can escape ``root``
or become hidden; the original name is also kept inside each file. A resumed run asks
:meth:`MapStore.scored_ids` which images are done and :meth:`MapStore.sources` which files their maps
were made from (so a changed image or mask is caught per image); :meth:`MapStore.class_sources` feeds
:func:`metrics.evaluate_stream` a class at a time, chunk file by chunk file, so that memory does
not grow with the size of a class (:mod:`class_metrics`).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

import numpy as np
import torch

from utils.errors import UserError
from utils.io import atomic_open
from utils.memory import release_free_memory

logger = logging.getLogger(__name__)

_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_CHUNK_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_DTYPES = {"float32": np.float32, "float16": np.float16}
_ARRAYS = ("ids", "maps", "masks", "labels", "image_scores")
_SOURCE_ARRAYS = ("image_sizes", "mask_sha256")  # absent from the chunks of older versions
_IMAGE_SHA = "image_sha256"  # absent from the chunks of older versions too (they identify images by size)


class SourceFiles(NamedTuple):
    """Identity of one test image's files: image file size in bytes, mask sha256 (16 hex digits; "" = no
    mask), image file sha256 (16 hex digits; "" = not recorded, in chunks of older versions)."""

    image_size: int
    mask_sha256: str
    image_sha256: str = ""


def safe_name(class_name: str) -> str:
    """Folder name for a class: ``%XX`` (UTF-8 bytes) for every character outside ``[A-Za-z0-9_-]``."""
    if not class_name:
        raise UserError("empty class name; every image needs a class name")
    return "".join(c if c in _SAFE_CHARS else "".join(f"%{b:02X}" for b in c.encode()) for c in class_name)


def original_name(folder: str) -> str:
    """Inverse of :func:`safe_name`."""
    return unquote(folder, errors="strict")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def masks_to_uint8(masks: Any) -> np.ndarray:
    """uint8 0..255 masks from uint8, bool or float 0..1 masks (a positive value stays >= 1)."""
    m = _numpy(masks)
    if m.dtype == np.uint8:
        return m
    if m.dtype == np.bool_:
        return m.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(m.dtype, np.floating) and (m.size == 0 or (m.min() >= 0 and m.max() <= 1)):
        q = np.rint(m * 255.0)
        return np.where(m > 0, np.maximum(q, 1), 0).astype(np.uint8)
    raise UserError(f"masks of dtype {m.dtype} are not uint8 0..255, bool or float 0..1")


def _load(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of one chunk file, and those of ``optional`` it holds; a corrupt or truncated file
    becomes a :class:`UserError`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in [*keys, *(k for k in optional if k in z.files)]}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(
            f"{path}: corrupt or truncated map chunk ({type(e).__name__}: {e}); "
            "delete it and re-run scoring to redo its images"
        ) from e


class MapStore:
    """Per-class chunk files of anomaly maps under ``root`` (see the module docstring).

    Args:
        root: the store's folder (created on the first write).
        dtype: "float32" (default; exact legacy reproduction) or "float16" (half the disk) for
            the maps written by this instance. Reading keeps each class in the dtype of its first chunk.
    """

    def __init__(self, root: str | os.PathLike, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise UserError(f"map store dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.root = Path(root)
        self.dtype = np.dtype(_DTYPES[dtype])

    # ---------------------------------------------------------------- writing
    def write(
        self,
        chunk_name: str,
        ids: Sequence[str],
        class_names: Sequence[str],
        maps: Any,
        masks: Any,
        labels: Any,
        image_scores: Any,
        sources: Sequence[SourceFiles] | None = None,
    ) -> list[Path]:
        """Write one batch, split by class, as ``{root}/{class}/{chunk_name}.npz`` files (atomically).

        ``maps`` [n, H, W], ``masks`` [n, H, W] (uint8 0..255, bool or float 0..1), ``labels`` [n],
        ``image_scores`` [n]; numpy or torch. ``sources`` [n]: the files each map was made from
        (stored as ``image_sizes``, ``mask_sha256`` and ``image_sha256``; None: not known, the chunk is not checked
        by :meth:`sources`). Writing the same ``chunk_name`` again replaces its files (a re-run
        batch). Returns the paths written.
        """
        if not _CHUNK_NAME.fullmatch(chunk_name):
            raise UserError(f"chunk name {chunk_name!r} must be letters, digits, '_', '-', '.' and not start with '.'")
        ids_a = np.asarray([str(i) for i in ids])
        names = np.asarray([str(c) for c in class_names])
        m, k = _numpy(maps), masks_to_uint8(masks)
        lab = _numpy(labels).astype(np.int8).ravel()
        sc = _numpy(image_scores).astype(np.float64).ravel()
        n = len(ids_a)
        src = (
            {}
            if sources is None
            else {
                "image_sizes": np.asarray([int(s.image_size) for s in sources], dtype=np.int64).reshape(-1),
                "mask_sha256": np.asarray([str(s.mask_sha256) for s in sources], dtype=str).reshape(-1),
                _IMAGE_SHA: np.asarray([str(s.image_sha256) for s in sources], dtype=str).reshape(-1),
            }
        )
        if (
            m.ndim != 3
            or len(m) != n
            or k.shape != m.shape
            or len(names) != n
            or len(lab) != n
            or len(sc) != n
            or any(len(a) != n for a in src.values())
        ):
            raise UserError(
                f"chunk {chunk_name}: ids ({n}), class_names ({len(names)}), maps {m.shape}, "
                f"masks {k.shape}, labels ({len(lab)}), image_scores ({len(sc)})"
                + ("" if sources is None else f", sources ({len(sources)})")
                + " do not match"
            )
        if len(np.unique(ids_a)) != n:
            raise UserError(f"chunk {chunk_name}: duplicate image ids in one batch")
        with np.errstate(over="ignore", invalid="ignore"):
            stored = m.astype(self.dtype)  # overflow checked just below
        if not np.isfinite(stored).all():
            raise UserError(
                f"chunk {chunk_name}: maps are NaN/inf or overflow {self.dtype} "
                "(use dtype float32 for maps above 65504)"
            )
        paths = []
        for cls in dict.fromkeys(names.tolist()):
            sel = names == cls
            path = self.root / safe_name(cls) / f"{chunk_name}.npz"
            with atomic_open(path, "wb") as f:
                np.savez(
                    f,
                    ids=ids_a[sel],
                    class_name=np.asarray(cls),
                    maps=stored[sel],
                    masks=k[sel],
                    labels=lab[sel],
                    image_scores=sc[sel],
                    **{key: a[sel] for key, a in src.items()},
                )
            paths.append(path)
        return paths

    # ---------------------------------------------------------------- reading
    def _class_dirs(self) -> dict[str, Path]:
        """{original class name: folder}, sorted by name; folders without chunk files are skipped."""
        if not self.root.is_dir():
            return {}
        dirs = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any(d.glob("*.npz")):
                try:
                    dirs[original_name(d.name)] = d
                except UnicodeDecodeError as e:
                    raise UserError(f"{d}: folder name is not an encoded class name; move it out of {self.root}") from e
        return dict(sorted(dirs.items()))

    def _index(self) -> dict[Path, np.ndarray]:
        """``ids`` of every chunk file; an id in two files is a :class:`UserError` naming both."""
        index: dict[Path, np.ndarray] = {}
        owner: dict[str, Path] = {}
        for d in self._class_dirs().values():
            for path in sorted(d.glob("*.npz")):
                ids = _load(path, ["ids"])["ids"]
                for i in ids.tolist():
                    if i in owner:
                        raise UserError(
                            f"image id {i!r} is stored twice: in {owner[i]} and in {path}; "
                            "delete one of the two chunk files"
                        )
                    owner[i] = path
                index[path] = ids
        return index

    def scored_ids(self) -> set[str]:
        """Ids of every image already in the store (reads only the ``ids`` arrays)."""
        return {i for ids in self._index().values() for i in ids.tolist()}

    def sources(self) -> tuple[dict[str, SourceFiles], list[Path]]:
        """``({id: SourceFiles}, chunks without them)``: the files each stored map was made from, as
        recorded when it was written; the second item lists the chunk files that record none (written
        by an older version). Reads only the small arrays, never the maps."""
        known: dict[str, SourceFiles] = {}
        unknown: list[Path] = []
        for d in self._class_dirs().values():
            for path in sorted(d.glob("*.npz")):
                chunk = _load(path, ["ids"], optional=(*_SOURCE_ARRAYS, _IMAGE_SHA))
                if not all(k in chunk for k in _SOURCE_ARRAYS):
                    unknown.append(path)
                    continue
                images = chunk[_IMAGE_SHA].tolist() if _IMAGE_SHA in chunk else [""] * len(chunk["ids"])
                known.update(
                    (i, SourceFiles(int(size), str(mask), str(image)))
                    for i, size, mask, image in zip(
                        chunk["ids"].tolist(),
                        chunk["image_sizes"].tolist(),
                        chunk["mask_sha256"].tolist(),
                        images,
                        strict=True,
                    )
                )
        return known, unknown

    def classes(self) -> list[str]:
        """Original names of the classes that have at least one chunk, sorted."""
        return list(self._class_dirs())

    def class_sources(self) -> Iterator[tuple[str, StoredClass]]:
        """Yield ``(class_name, StoredClass)`` in name order: each class as a
        :class:`class_scan.ClassSource` that reads its chunk files one at a time, as often as asked."""
        index = self._index()
        for cls, d in self._class_dirs().items():
            files = [p for p in index if p.parent == d]
            yield cls, StoredClass(cls, files, [index[p] for p in files])

    def iter_classes(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Yield ``(class_name, {"ids", "maps", "masks", "labels", "image_scores"})`` one class at a time.

        Classes in name order, images sorted by id. The whole class is in memory (each array filled in
        place, no concatenated copies): for small stores and tests; the evaluation reads
        :meth:`class_sources` chunk by chunk instead.
        """
        for cls, source in self.class_sources():
            all_ids = np.concatenate(source.ids)
            order = np.argsort(all_ids, kind="stable")
            dest = np.empty_like(order)
            dest[order] = np.arange(len(order))  # row of the sorted output for each stored row
            out: dict[str, np.ndarray] = {"ids": all_ids[order]}
            start = 0
            for chunk in source.chunks(_ARRAYS):
                rows = dest[start : start + len(chunk["ids"])]
                start += len(rows)
                for key in ("maps", "masks", "labels", "image_scores"):
                    arr = chunk[key]
                    if key not in out:
                        out[key] = np.empty((len(all_ids), *arr.shape[1:]), dtype=arr.dtype)
                    elif out[key].shape[1:] != arr.shape[1:]:
                        raise UserError(
                            f"{chunk['path']}: {key} of shape {arr.shape[1:]} differ from "
                            f"{out[key].shape[1:]} in the other chunks of class {cls!r}"
                        )
                    out[key][rows] = arr
            logger.debug("loaded class %s: %d images from %d chunks", cls, len(all_ids), len(source.files))
            yield cls, out

    def read_images(self, class_name: str, ids: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
        """``{id: {"map", "mask"}}`` for the images ``ids`` of one class, reading only the chunks that hold them."""
        wanted = set(ids)
        d = self._class_dirs().get(class_name)
        out: dict[str, dict[str, np.ndarray]] = {}
        for path in sorted(d.glob("*.npz")) if d is not None else []:
            chunk_ids = _load(path, ["ids"])["ids"].tolist()
            rows = [i for i, image_id in enumerate(chunk_ids) if image_id in wanted]
            if rows:
                chunk = _load(path, ["maps", "masks"])
                out.update({chunk_ids[i]: {"map": chunk["maps"][i], "mask": chunk["masks"][i]} for i in rows})
        return out


class StoredClass:
    """One class of a :class:`MapStore` as a :class:`class_scan.ClassSource`: its chunk files,
    read one at a time in file order each time :meth:`chunks` is called (images in id order within a file)."""

    def __init__(self, name: str, files: Sequence[Path], ids: Sequence[np.ndarray]) -> None:
        self.name, self.files, self.ids = name, list(files), list(ids)

    def __len__(self) -> int:
        return sum(len(i) for i in self.ids)

    def chunks(self, keys: Sequence[str] = ("ids", "maps", "masks")) -> Iterator[dict[str, Any]]:
        """``{key: array}`` of each chunk file (and ``"path"``), checked against the class and the indexed ids."""
        for path, ids in zip(self.files, self.ids, strict=True):
            chunk = _load(path, ["class_name", *dict.fromkeys(("ids", *keys))])
            if str(chunk["class_name"]) != self.name:
                raise UserError(
                    f"{path}: holds class {str(chunk['class_name'])!r} but lies in the folder of {self.name!r}"
                )
            if not np.array_equal(chunk["ids"], ids):
                raise UserError(f"{path}: changed while being read; re-run the evaluation")
            yield {**{k: chunk[k] for k in keys}, "path": path}
            del chunk
            release_free_memory()  # what the caller did with the chunk is freed: keep the heap from growing
