"""`pip install -e .` makes ldm, vlmdiff and utils importable from any folder, configs/ included.

One editable install into a throw-away virtual environment that sees the dependencies of the environment
running the tests, so nothing is downloaded; the modules are then run from another folder.

``venv --system-site-packages`` would not do: it shows the base interpreter's packages, not those of a
virtual environment the tests run in (on a fresh machine, an old setuptools that cannot read
pyproject.toml, and no torch). A ``.pth`` file naming this environment's site-packages folders shows
exactly the packages the tests see. Its lines only extend ``sys.path``: the ``.pth`` files inside those
folders are not run, so an editable install of this checkout in the outer environment stays invisible
and only the install made here can resolve the packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    inner = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(inner) / "outer_environment.pth").write_text("".join(f"{p}\n" for p in outer))
    # The outer environment's pip and setuptools (seen through that .pth file) do the install.
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            str(ROOT),
        ],
        check=True,
        cwd=venv,
    )
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the installation may find the code
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_modules_run_from_another_folder(installed_python: Path, tmp_path: Path) -> None:
    for module, expected in (("vlmdiff.evaluation.report", "--protocol"), ("vlmdiff.evaluation.metrics", "--protocol")):
        out = _run(installed_python, "-m", module, "--help", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert expected in out.stdout and "usage:" in out.stdout


def test_packages_and_presets_resolve_to_the_checkout(installed_python: Path, tmp_path: Path) -> None:
    code = (
        "import ldm, utils, vlmdiff; from vlmdiff.config import load_model_config; "
        "print(ldm.__file__, utils.__file__, vlmdiff.__file__); print(load_model_config('tiny').unet.model_channels)"
    )
    out = _run(installed_python, "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files, channels = out.stdout.splitlines()
    assert all(Path(f).is_relative_to(ROOT) for f in files.split())
    assert channels == "32"
