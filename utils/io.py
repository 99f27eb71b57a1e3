"""Atomic file writes: a reader, a crash or a full disk never sees a half-written file.

Every file the scripts produce goes through these helpers: the bytes go to a temporary file in the
target's folder, are flushed to disk, then renamed over the target (``os.replace`` is atomic on POSIX).
If anything fails, the temporary file is removed and the previous target, if any, is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from utils.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path``; on a clean exit it is flushed to disk and replaces ``path``.

    For writers that take a file name (``safetensors.torch.save_file`` streams the tensors to it); see
    :func:`atomic_open` for writers that take a file object. The file gets the mode a plain ``open``
    would give it (0666 less the process umask), so a team's umask (e.g. 002) is honoured. Any failure
    (no folder, read-only folder, full disk, also as the ``RuntimeError`` torch's writer raises for a
    full disk) becomes one :class:`UserError` naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        mode = 0o666 & ~current_umask()
        try:
            os.fchmod(fd, mode)  # mkstemp makes 0600
        finally:
            os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, mode)  # again: a writer may have replaced the file (safetensors writes a new 0600 one)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _silent_unlink(tmp)
        blocker = _file_in_the_way(path.parent)
        if blocker is not None:
            raise UserError(
                f"could not write {path}: {blocker} is a file, not a folder; choose another output path"
            ) from e
        raise UserError(f"could not write {path}: {e.strerror or e} (check free disk space and permissions)") from e
    except RuntimeError as e:
        free = _free_space(path.parent)  # before the temporary file is removed
        _silent_unlink(tmp)
        if not _is_torch_write_failure(e):
            raise
        raise UserError(
            f"could not write {path}: the write failed part-way ({free}; torch: "
            f"{_first_line(e)}); check free disk space and permissions"
        ) from e
    except BaseException:
        _silent_unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically (see
    :func:`atomic_path` for the file mode and the errors)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    for p in (folder, *folder.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows, else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_torch_write_failure(e: RuntimeError) -> bool:
    """torch.save reports a failed write (e.g. ENOSPC) as a RuntimeError of its zip writer."""
    text = str(e)
    return any(s in text for s in ("PytorchStreamWriter", "inline_container", "file write failed"))


def _free_space(folder: Path) -> str:
    try:
        st = os.statvfs(folder)
    except OSError:
        return "free space unknown"
    return f"{st.f_bavail * st.f_frsize / 2**20:.2f} MiB free there"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _silent_unlink(p: str | None) -> None:
    if p is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(p)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, turning a missing or malformed file into one clear :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML file whose top level is a mapping (via OmegaConf, so ``1e-5`` is a number) as plain data."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = OmegaConf.load(path)
        if isinstance(data, DictConfig):
            return OmegaConf.to_container(data, resolve=True)  # ${...} interpolations resolved here
    except Exception as e:  # noqa: BLE001 - YAML scanner/parser and interpolation errors share no public base class
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
    raise UserError(f"{path}: expected a mapping (key: value lines) at the top level")
