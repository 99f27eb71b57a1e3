"""Every script answers --help before it imports the model stack (torch, Lightning, transformers, ...).

A process is what this is about, so each --help runs in its own interpreter, under ``python -X importtime``:
the test reads which modules were imported (a timing bound alone would flake on a loaded machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers", "matplotlib", "sklearn", "scipy")
SCRIPTS = [
    ["captioner.py"],
    ["finetune_autoencoder.py"],
    ["build_model.py"],
    ["train.py"],
    ["test.py"],
    ["scripts/demo.py"],
    ["utils/prepare_coco_ad.py"],
    ["scripts/reproduce.py"],
    ["-m", "vlmdiff.export"],
    ["-m", "vlmdiff.evaluation.report"],
]


def _imported(importtime: str) -> set[str]:
    """Module names in ``python -X importtime``'s report (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("script", SCRIPTS, ids=" ".join)
def test_help_imports_no_heavy_module(script: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *script, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "--help" in done.stdout
    imported = _imported(done.stderr)
    assert "argparse" in imported  # the report was read
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not heavy, f"{' '.join(script)} --help imported {', '.join(heavy[:5])}"


def test_library_modules_of_the_parsers_import_nothing_heavy() -> None:
    """The modules the parsers are built from stay light; the model stack is imported where it is used."""
    modules = [
        "utils.cli",
        "utils.progress",
        "vlmdiff.cli",
        "vlmdiff.distributed",
        "vlmdiff.data",
        "vlmdiff.data.common",
        "vlmdiff.data.registry",
        "vlmdiff.vlm_backends",
    ]
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in {HEAVY!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ""
