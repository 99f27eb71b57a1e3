"""bench/gpu.sh stops before any work, with one error line, when it is asked for CUDA and no GPU is visible.

These tests are about the shell script as a process, so they start it with bash. CUDA_VISIBLE_DEVICES=""
hides any GPU the machine has, so the no-GPU path is taken on every machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_gpu_sh(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    environ["BENCH_OUT"] = str(tmp_path / "gpu.json")
    environ.update(env)
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")], env=environ, capture_output=True, text=True, timeout=120
    )


def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path):
    done = _run_gpu_sh(tmp_path)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: bench/gpu.sh: BENCH_DEVICE=cuda needs a CUDA GPU")
    assert "BENCH_DEVICE=cpu" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_bench_device_cpu_goes_past_the_check(tmp_path):
    # PYTHON=false: the first benchmark step fails at once, which shows the GPU check let the run start
    done = _run_gpu_sh(tmp_path, BENCH_DEVICE="cpu", PYTHON="false")
    assert done.returncode != 0
    assert "== inference: upstream's way vs ours (sd15, cpu)" in done.stdout
    assert "needs a CUDA GPU" not in done.stdout + done.stderr
