"""What made a result: seed, config, library versions, git commit, command line, time.

Saved beside every checkpoint and metrics file, so a number can be traced to the code and settings
that produced it. Fields that change from run to run (time, host) are kept apart from the results.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "lightning", "transformers", "numpy", "scipy", "scikit-learn", "timm")


def git_commit() -> str | None:
    """The checked-out commit (with '+dirty' when tracked files changed), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(seed: int | None = None, config: dict | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "seed": seed,
        "config": config,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        **extra,
    }
