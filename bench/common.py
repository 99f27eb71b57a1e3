"""Helpers the benchmark scripts share: timing, peak memory, child processes, a results file, a table.

The scripts put the repository root on ``sys.path`` themselves and import this as ``bench.common``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MemoryMeter:
    """Peak memory above the level at :meth:`reset`: CUDA allocator bytes, or on CPU the process's RSS.

    On CPU the kernel's peak-RSS mark (VmHWM) is reset through ``/proc/self/clear_refs`` and freed
    heap memory is returned to the system first (``malloc_trim``), so one process can measure
    several stretches of code one after the other (Linux only).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "extra CUDA allocated" if device.type == "cuda" else "extra RSS"
        self.base = 0.0

    def reset(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _proc_status_mib("VmRSS")

    def peak_mib(self) -> float:
        """Peak MiB above the level at the last :meth:`reset`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return _proc_status_mib("VmHWM") - self.base


def _proc_status_mib(field: str) -> float:
    """A ``kB`` field of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def load_average() -> float:
    """The 1-minute load average: timings on a shared 2-core machine are trustworthy below ~1.3."""
    return os.getloadavg()[0]


def run_child(script: Path, args: Sequence[str]) -> tuple[dict[str, Any], float]:
    """Run ``python script *args`` in a fresh process; return the last stdout line as JSON and its peak RSS (MiB).

    A child per measurement keeps one measurement's peak memory from hiding the next one's.
    """
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"child {script.name} {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024.0  # Linux: KiB


def environment() -> dict[str, Any]:
    """Versions, thread count, CPU/GPU name and the load average at the time of writing."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": load_average(),
        "platform": platform.platform(),
    }


def write_results(name: str, results: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write ``{"environment": ..., **results}`` to ``path`` (default bench/results/{name}.json)."""
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **results}, indent=2, default=float) + "\n")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 3 significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
