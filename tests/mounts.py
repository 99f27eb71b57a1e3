"""Real file-system limits for tests: a small tmpfs (a disk that fills up) and a read-only mount.

Mounting needs root (CAP_SYS_ADMIN); without it the tests that need a mount are skipped, saying so.
Root ignores permission bits, so a read-only mount is the honest way to get EROFS as root.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here ({' '.join(args)}): {done.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(
    path: Path, size: str = "1m", files: dict[str, bytes] | None = None, readonly: bool = False
) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` holding ``files`` (relative name -> bytes), read-only if
    asked (the files are written before the remount); unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        for name, data in (files or {}).items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        if readonly:
            _mount("-o", "remount,ro", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
