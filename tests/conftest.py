"""Shared test set-up: offline hubs and the reference-fixture folder.

The fixtures produced by the upstream code live outside the repository. Tests find them through
``VLMDIFF_FIXTURES`` (default ``../shared/fixtures`` from the project root) and fail, not skip,
when they are missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# No test may reach a model hub; without network a hub id must fail loudly, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def fixtures_path() -> Path:
    return Path(os.environ.get("VLMDIFF_FIXTURES", ROOT.parent / "shared" / "fixtures")).resolve()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = fixtures_path()
    if not (path / "README.md").is_file():
        pytest.fail(f"reference fixtures not found at {path}: set VLMDIFF_FIXTURES to the fixtures folder")
    return path


@pytest.fixture(scope="session")
def tiny_config(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "tiny_config.json").read_text())


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads
    waiting on each other make every stage several times slower. Restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
