"""Shared test set-up: offline hubs and the reference-fixture folder.

The reference fixtures produced by the upstream code live in ``tests/fixtures/`` (their README says
what each file holds). ``VLMDIFF_FIXTURES`` points the tests at another folder of the same kind;
the tests fail, not skip, when the folder is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (a session fixture: a real SLURM cluster on localhost)

# No test may reach a model hub; without network a hub id must fail loudly, not hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def fixtures_path() -> Path:
    return Path(os.environ.get("VLMDIFF_FIXTURES", ROOT / "tests" / "fixtures")).resolve()


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
