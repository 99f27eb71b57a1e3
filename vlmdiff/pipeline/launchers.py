"""Run a plan: on this machine, one job after another, or as SLURM jobs chained by ``afterok`` dependencies.

Local: each command is the stage script's own ``main(argv)``, called in this process, in order.

SLURM: every job becomes ``RUN/jobs/NN_stage.sbatch`` (readable, resubmittable), submitted with plain
``sbatch --parsable --dependency=afterok:...``; the test shards are a job array whose index picks the
shard. The scheduler does the ordering, the retries (``--requeue`` on long jobs: a requeued training
job resumes from its last.ckpt) and the arrays; nothing here polls or waits. Each job script records
its outcome in ``RUN/status/KEY[_TASK].{ok,failed}`` (the exit code) and logs to ``RUN/logs/``; the
submitted ids are in ``RUN/jobs.json``. :func:`status` reads them back (and ``scontrol``/``sacct``
where available) and names a failed stage, its job id and its log in one line.
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.io import read_json, write_json, write_text
from vlmdiff.pipeline.plan import Job, command_line

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
JOBS_FILE = "jobs.json"


# ------------------------------------------------------------------------------------------- local
def _entry_point(argv: list[str]) -> tuple[Any, list[str]]:
    """The ``main`` of a command (``script.py`` at the repository root, or ``-m module``) and its arguments."""
    if argv[0] == "-m":
        return importlib.import_module(argv[1]).main, argv[2:]
    name = Path(argv[0]).stem
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name).main, argv[1:]


def resolved_commands(job: Job) -> list[list[str]]:
    """The job's commands as they run now (``--resume`` added where its checkpoint exists)."""
    commands = [list(c) for c in job.commands]
    if job.resume_if and Path(job.resume_if[0]).is_file():
        commands[0].append(job.resume_if[1])
    return commands


def run_local(jobs: list[Job], run: Path, threads: int = 0) -> None:
    """Run ``jobs`` in order in this process; a failing job stops the run (status/KEY.failed says which).

    ``threads`` > 0 sets torch's CPU threads for the run (restored afterwards).
    """
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        _run_jobs(jobs, run)
    finally:
        torch.set_num_threads(before)


def _run_jobs(jobs: list[Job], run: Path) -> None:
    status_dir = run / "status"
    status_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        for f in status_dir.glob(f"{job.key}.*"):
            f.unlink()
        log.info("=== %s", job.key)
        start = time.perf_counter()
        try:
            for argv in resolved_commands(job):
                log.info("$ %s", command_line(argv))
                main, args = _entry_point(argv)
                rc = main(args)
                if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
                    raise UserError(f"stage {job.stage} ({job.key}) exited with code {rc}")
        except BaseException as e:
            code = e.code if isinstance(e, SystemExit) else 1
            write_text(status_dir / f"{job.key}.failed", f"{code}\n")
            raise
        write_text(status_dir / f"{job.key}.ok", "0\n")
        log.info("--- %s done in %.0f s", job.key, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------- SLURM
def job_script(job: Job, run: Path, recipe_name: str, threads: int = 0, python: str = sys.executable) -> str:
    """The sbatch script of ``job``: #SBATCH resources, the commands, the status file with the exit code."""
    r = job.resources
    array = bool(job.shards)
    # several GPUs: one task per GPU started by srun, as Lightning's SLURM environment expects (ranks from SLURM)
    tasks = r.gpus if job.stage == "train" and r.gpus > 1 else 1
    launch = "srun " if tasks > 1 else ""
    log_name = f"{job.key}_%A_%a.log" if array else f"{job.key}_%j.log"
    lines = [
        "#!/bin/bash",
        f"# {recipe_name}: {job.stage}" + (f" (COCO-AD part {job.part})" if job.part is not None else ""),
        "# Written by scripts/reproduce.py; resubmit by hand with: sbatch [--dependency=afterok:ID] THIS_FILE",
        f"#SBATCH --job-name=vlmdiff-{recipe_name}-{job.key}",
        f"#SBATCH --output={run / 'logs' / log_name}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --time={r.time}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --cpus-per-task={r.cpus}",
        f"#SBATCH --mem={r.mem_gb}G",
        "#SBATCH --kill-on-invalid-dep=yes",
    ]
    if r.gpus:
        lines.append(f"#SBATCH --gres=gpu:{r.gpus}")
    if r.partition:
        lines.append(f"#SBATCH --partition={r.partition}")
    lines.append("#SBATCH --requeue" if r.requeue else "#SBATCH --no-requeue")
    if array:
        lines.append(f"#SBATCH --array=0-{len(job.shards) - 1}")
    lines += [
        "",
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export OMP_NUM_THREADS={threads or r.cpus}",
        f"STATUS={shlex.quote(str(run / 'status' / job.key))}" + ("_${SLURM_ARRAY_TASK_ID}" if array else ""),
        'mkdir -p "$(dirname "$STATUS")"',
        'rm -f "$STATUS.ok" "$STATUS.failed"',
        'echo "job ${SLURM_JOB_ID:-?} on $(hostname) at $(date -Is), restart ${SLURM_RESTART_COUNT:-0}"',
    ]
    if array:
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for i, (start, end) in enumerate(job.shards):
            lines.append(f"  {i}) START={start}; END={end} ;;")
        lines.append("esac")
    lines.append("rc=0")
    for i, argv in enumerate(job.commands):
        text = " ".join(
            shlex.quote(a) if a not in ("{start}", "{end}") else ("$START" if a == "{start}" else "$END") for a in argv
        )
        if i == 0 and job.resume_if:
            path, flag = job.resume_if
            lines.append(f"RESUME=(); [ -f {shlex.quote(path)} ] && RESUME=({flag})")
            text += ' "${RESUME[@]}"'
        lines.append(f'[ "$rc" = 0 ] && {{ {launch}{shlex.quote(python)} {text}; rc=$?; }}')
    lines += [
        'if [ "$rc" = 0 ]; then echo 0 > "$STATUS.ok"; else echo "$rc" > "$STATUS.failed"; fi',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def submit_slurm(jobs: list[Job], run: Path, recipe_name: str, done_keys: set[str], threads: int = 0) -> dict[str, Any]:
    """Write each job's script and submit it after its unfinished dependencies; returns what jobs.json records."""
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm: sbatch not found on this machine (run on a SLURM login node)")
    for sub in ("jobs", "logs", "status"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    active = [e for e in job_states(run) if e["state"].split()[0] in ("pending", "running", "requeued", "configuring")]
    if active:
        ids = " ".join(e["job_id"] for e in active)
        raise UserError(
            f"{run}: jobs of an earlier submission are still queued or running ({ids}); wait for them "
            f"(python scripts/reproduce.py --status {run}) or cancel them (scancel {ids}) before submitting again"
        )
    earlier = read_json(run / JOBS_FILE) if (run / JOBS_FILE).is_file() else None
    ids: dict[str, str] = {}
    record: dict[str, Any] = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": []}
    if earlier:
        record["earlier"] = [*earlier.get("earlier", []), {k: v for k, v in earlier.items() if k != "earlier"}]
    for job in jobs:
        script = run / "jobs" / f"{job.key}.sbatch"
        write_text(script, job_script(job, run, recipe_name, threads))
        for f in (run / "status").glob(f"{job.key}*.*"):
            f.unlink()
        deps = [ids[k] for k in job.after if k in ids and k not in done_keys]
        cmd = ["sbatch", "--parsable"]
        if deps:
            cmd.append("--dependency=afterok:" + ":".join(deps))
        cmd.append(str(script))
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            _write_record(run, record)
            raise UserError(f"sbatch {script} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
        job_id = out.stdout.strip().split(";")[0]
        ids[job.key] = job_id
        log_name = f"{job.key}_{job_id}_%a.log" if job.shards else f"{job.key}_{job_id}.log"
        record["jobs"].append(
            {
                "key": job.key,
                "stage": job.stage,
                "part": job.part,
                "job_id": job_id,
                "array": len(job.shards),
                "after": deps,
                "script": str(script),
                "log": str(run / "logs" / log_name),
            }
        )
        log.info("submitted %s as job %s%s", job.key, job_id, f" after {','.join(deps)}" if deps else "")
    _write_record(run, record)
    return record


def _write_record(run: Path, record: dict[str, Any]) -> None:
    write_json(run / JOBS_FILE, record)


# ------------------------------------------------------------------------------------------- status
def _scheduler_state(job_id: str) -> str | None:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...; an array: its worst)."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=False)
        states = [w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("JobState=")]
        reasons = [w.split("=", 1)[1] for w in out.stdout.split() if w.startswith("Reason=")]
        if states:
            for bad in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED"):
                if bad in states:
                    return bad
            state = states[0]
            return f"{state} ({reasons[0]})" if reasons and reasons[0] != "None" else state
    if shutil.which("sacct"):
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, check=False
        )
        states = [s.split()[0] for s in out.stdout.split("\n") if s.strip()]
        if states:
            return states[0]
    return None


def _log_files(entry: dict[str, Any]) -> list[Path]:
    log = entry["log"]
    if entry.get("array"):
        return [Path(log.replace("%a", str(i))) for i in range(entry["array"])]
    return [Path(log)]


def job_states(run: Path) -> list[dict[str, Any]]:
    """Every recorded job of the run folder with ``state`` (ok, failed, or the scheduler's) and its exit code."""
    path = run / JOBS_FILE
    if not path.is_file():
        return []
    out = []
    for entry in read_json(path)["jobs"]:
        n = max(1, entry.get("array", 0))
        names = [entry["key"]] if not entry.get("array") else [f"{entry['key']}_{i}" for i in range(n)]
        failed = [(run / "status" / f"{k}.failed") for k in names if (run / "status" / f"{k}.failed").is_file()]
        oks = [k for k in names if (run / "status" / f"{k}.ok").is_file()]
        e = dict(entry)
        if failed:
            e["state"], e["exit_code"] = "failed", failed[0].read_text().strip()
            idx = names.index(failed[0].stem)
            e["failed_log"] = str(_log_files(entry)[idx])
        elif len(oks) == n:
            e["state"] = "ok"
        else:
            e["state"] = (_scheduler_state(entry["job_id"]) or "unknown").lower()
        out.append(e)
    return out


def status_line(run: Path) -> str:
    """One line: the first failed stage (its job id, exit code and log), or where the run stands."""
    states = job_states(run)
    if not states:
        return status_of_local(run) or f"{run}: no failed stage and no SLURM jobs recorded"
    for e in states:
        if e["state"] == "failed":
            return (
                f"FAILED: stage {e['stage']}"
                + (f" (part {e['part']})" if e.get("part") is not None else "")
                + f", job {e['job_id']}, exit code {e['exit_code']}, log {e['failed_log']}"
                + _last_error(Path(e["failed_log"]))
            )
    for e in states:
        if e["state"].split()[0] in ("failed", "cancelled", "timeout", "out_of_memory", "node_fail"):
            return f"FAILED: stage {e['stage']}, job {e['job_id']} ended {e['state']}, log {_log_files(e)[0]}"
    if all(e["state"] == "ok" for e in states):
        return f"{run}: all {len(states)} jobs finished; paper table: {run / 'paper_table.md'}"
    running = [f"{e['stage']} {e['job_id']} {e['state']}" for e in states if e["state"] != "ok"]
    return f"{run}: {len(states) - len(running)} of {len(states)} jobs finished; " + "; ".join(running)


def _last_error(log_file: Path, limit: int = 300) -> str:
    """`` -- `` and the log's last ``error:`` line (the scripts' one-line errors), else its last line; or ""."""
    if not log_file.is_file():
        return ""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()[-200:] if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    last = (errors or lines or [""])[-1]
    return f" -- {last[:limit]}" if last else ""


def status_of_local(run: Path) -> str | None:
    """The failed job of a local run (status/KEY.failed), if any."""
    failed = sorted((run / "status").glob("*.failed")) if (run / "status").is_dir() else []
    if not failed:
        return None
    f = failed[0]
    return f"FAILED: stage {f.stem} exit code {f.read_text().strip()} (local run; its output was on the console)"


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and bool(os.environ.get("SLURM_CONF") or Path("/etc/slurm").is_dir())
