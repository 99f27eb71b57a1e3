"""A batch job's log (standard error not a terminal) holds no dependency noise: Lightning's srun advice and
worker-count notice, its tips, the Hugging Face loading bars; Lightning's own messages appear once.

What is under test is a process's standard error, so the script runs in a subprocess with a pipe for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging
from utils.cli import setup_logging

setup_logging()
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

SLURMEnvironment._validate_srun_used()  # Lightning's own check: an srun program is on PATH
rank_zero_warn("The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing")
rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
rank_zero_info("GPU available: False, used: False")
rank_zero_warn("a Lightning warning that stays")
from transformers.utils import logging as hf_logging

for _ in hf_logging.tqdm(range(3), desc="Loading checkpoint shards"):
    pass
from huggingface_hub.utils import tqdm as hub_tqdm

for _ in hub_tqdm(range(3), desc="Fetching 3 files"):
    pass
logging.getLogger("vlmdiff.test").warning("our own warning stays")
"""


def test_batch_log_lacks_dependency_noise(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HF_HUB_DISABLE"))}
    env.update(PYTHONPATH=str(ROOT), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    for noise in ("srun", "does not have many workers", "Tip", "litlogger", "Loading checkpoint shards", "Fetching"):
        assert noise not in err, f"{noise!r} in the batch log:\n{err}"
    assert "a Lightning warning that stays" in err and "our own warning stays" in err  # not everything is hidden
    assert err.count("GPU available: False, used: False") == 1, err  # once, not twice
