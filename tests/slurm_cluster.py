"""A real SLURM cluster on localhost for tests (scripts/slurm_local_cluster.sh) and helpers to run jobs on it.

The session-scoped ``slurm_cluster`` fixture (registered in tests/conftest.py) starts one cluster for all
tests that ask for it and stops it at the end. Where SLURM cannot run here (packages missing, not root)
those tests skip and say why; under ``CI=true`` (.ci/run installs the packages) that is a failure instead.

    def test_x(slurm_cluster: SlurmCluster, tmp_path):
        job = slurm_cluster.sbatch(["--output", str(tmp_path / "x.out"), "--wrap", "echo hi"], cwd=tmp_path)
        info = slurm_cluster.wait(job)          # polls `scontrol show job` until an end state
        assert info["JobState"] == "COMPLETED"
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_local_cluster.sh"

# JobState values after which a job does not run again by itself (a requeued job passes through
# REQUEUED and PENDING, which are not among them)
END_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


def unavailable_reason() -> str | None:
    """Why no SLURM cluster can be started on this machine, or None when it can."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin
    missing = [n for n in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged") if shutil.which(n, path=path) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmctld and slurmd needs root"
    return None


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its folder (slurm.conf, logs, state) and the calls the tests make on it."""

    folder: Path

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """This process's environment pointed at the cluster (``SLURM_CONF``), plus ``extra``."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **(extra or {})}

    def run(self, args: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """Run a SLURM command (``["scontrol", ...]``) against this cluster; its stdout, or an assertion error."""
        done = subprocess.run(
            list(args), cwd=cwd, env=self.env(env), capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
        return done.stdout

    def sbatch(self, args: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """Submit ``sbatch --parsable *args`` (a script path and its arguments, or ``--wrap``); the job id.

        The job inherits this process's environment plus ``env`` (sbatch exports it), so PYTHONPATH and
        the venv reach it.
        """
        return self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, StartTime, EndTime, ExitCode, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id])
        return parse_job(out)

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, str]], bool] | None = None,
        timeout_s: float = 120,
        interval_s: float = 0.2,
    ) -> dict[str, str]:
        """Poll the job until ``until(job)`` holds (default: an end state, see END_STATES); the last record.

        On timeout the assertion names the job's last state and the tail of its output file.
        """
        until = until or (lambda info: info["JobState"] in END_STATES)
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {info['JobState']} ({info.get('Reason')}) after {timeout_s:g} s\n"
                    + self.output_tail(info)
                    + self.daemon_logs()
                )
            time.sleep(interval_s)

    def requeue(self, job_id: str) -> None:
        """What a preemption does: SIGTERM to the running job, which then returns to the queue.

        SLURM holds a requeued job for about two minutes (Reason=BeginTime); ``StartTime=now`` a second
        after the requeue lifts that hold, so the job starts again within seconds.
        """
        self.run(["scontrol", "requeue", job_id])
        self.wait(job_id, lambda info: info["JobState"] == "PENDING", timeout_s=60, interval_s=0.1)
        # slurmd refuses to start a job again in the second its kill was recorded ("Job credential revoked")
        time.sleep(1.1)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def daemon_logs(self, lines: int = 15) -> str:
        """The last lines of slurmctld's and slurmd's logs (for assertion messages; MPI plugin noise left out)."""
        out = []
        for path in sorted(self.folder.glob("*.log")):
            kept = [line for line in path.read_text(errors="replace").splitlines() if "mpi" not in line.lower()]
            out.append(f"--- {path}\n" + "\n".join(kept[-lines:]))
        return "\n" + "\n".join(out)

    @staticmethod
    def output_tail(info: dict[str, str], chars: int = 3000) -> str:
        """The end of the job's StdOut file (for assertion messages)."""
        path = Path(info.get("StdOut", ""))
        if not path.is_file():
            return f"(no output file {path})"
        return f"--- {path}\n{path.read_text(errors='replace')[-chars:]}"


def parse_job(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` of ``scontrol show job --oneliner`` (values without spaces, as SLURM prints them)."""
    fields: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def job_time(value: str) -> datetime.datetime:
    """A StartTime / EndTime of ``scontrol show job`` (local time, whole seconds)."""
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S")


def start_cluster(folder: Path, nodes: int = 1) -> SlurmCluster:
    """Start a cluster of ``nodes`` slurmd daemons with its config and state in ``folder`` (must be new or empty).

    Raises RuntimeError with the script's message when it does not come up.
    """
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", str(folder), str(nodes)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        stop_cluster(SlurmCluster(folder))  # whatever did start
        raise RuntimeError(f"{CLUSTER_SCRIPT.name} start failed: {(done.stderr or done.stdout).strip()}")
    return SlurmCluster(folder.resolve())


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs and stop its daemons (by the pids in their pid files)."""
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(cluster.folder)], timeout=120, check=False)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One single-node SLURM cluster for the session; tests skip where SLURM cannot run (fail under CI=true)."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no SLURM cluster can be started: {reason}")
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
