"""One output folder, one job: a lock file per job that names its host, pid and the part it writes.

A job that writes into a folder (a test run, a training run) first claims it: it writes
``{folder}/.lock.{host}.{pid}.json`` holding its host, pid, command line, start time and the span
of test images it scores (``[start, end)``; the whole set for a training run or an evaluation).
A claim is refused, with one line naming the other job, while a live job holds an overlapping
span; so shards with disjoint ``--start_ind/--end_ind`` share a folder, and of a multi-process
job (DDP, torchrun) only global rank 0 claims. A lock whose job is dead (same host, no such pid,
or the pid now belongs to a younger process) is stale and taken over with a warning. A lock from
another host cannot be checked from here: the message says to delete it if that job is gone.
The check-and-write runs under ``fcntl.flock`` on the folder itself where the file system
supports it, so two jobs started at once cannot both pass it. The lock is removed when the
job's ``with`` block ends, however it ends (with the folder and the parents the job made, if it left
them empty); a killed job leaves it behind, stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.io import current_umask

log = logging.getLogger(__name__)

PATTERN = ".lock.*.json"


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(claim: dict[str, Any]) -> bool:
    """Whether the job of a lock on this host still runs (a reused pid does not count)."""
    pid = int(claim.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    ticks = claim.get("start_ticks")
    now = _start_ticks(pid)
    return ticks is None or now is None or ticks == now


def _overlap(a: list, b: list) -> bool:
    a_end = float("inf") if a[1] is None else a[1]
    b_end = float("inf") if b[1] is None else b[1]
    return a[0] < b_end and b[0] < a_end


def _span_text(span: list) -> str:
    return "all images" if span == [0, None] else f"images [{span[0]}, {'end' if span[1] is None else span[1]})"


@contextlib.contextmanager
def _mutex(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock: the claim is still checked, just not atomically
            log.debug("no flock on %s (%s)", folder, e)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def claim_folder(
    folder: str | os.PathLike, job: str, hint: str, span: tuple[int, int | None] = (0, None), holder: bool = True
) -> Iterator[Path | None]:
    """Hold ``folder`` for this job while the ``with`` block runs (see the module docstring).

    Args:
        folder: the output folder (created if missing).
        job: what this job is, for the other job's message ("test.py scoring", "train.py").
        hint: the flag that picks another folder ("--output_dir").
        span: ``(start, end)`` of the test images this job writes; end None = to the end.
        holder: False for the processes of a job that do not claim (ranks other than 0).
    Yields the lock file (None when not ``holder``).
    """
    folder = Path(folder)
    if not holder:
        yield None
        return
    host, pid = socket.gethostname(), os.getpid()
    mine = folder / f".lock.{host}.{pid}.json"
    claim = {
        "host": host,
        "pid": pid,
        "start_ticks": _start_ticks(pid),
        "job": job,
        "span": [span[0], span[1]],
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # made by this job, deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _mutex(folder):
            for path in sorted(folder.glob(PATTERN)):
                if path == mine:
                    continue
                _refuse_if_live(path, claim, hint)
            part = mine.with_name(mine.name + ".part")  # renamed into place: no job ever reads half a lock
            try:
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 & ~current_umask())
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(claim, f)
                os.replace(part, mine)
            finally:
                with contextlib.suppress(OSError):
                    part.unlink()
    except OSError as e:
        where = f" ({e.filename})" if e.filename and Path(e.filename) != folder else ""
        raise UserError(
            f"cannot write into {folder}: {e.strerror or e}{where}; "
            f"check its permissions and free space, or choose another {hint}"
        ) from e
    try:
        yield mine
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()
            for made in created:  # a job that wrote nothing leaves no empty folder behind (results/ too)
                made.rmdir()  # only if empty: rmdir refuses a folder the job wrote into, and stops here


def _refuse_if_live(path: Path, claim: dict[str, Any], hint: str) -> None:
    """Remove a stale lock; raise a UserError naming the job of a live one whose span overlaps ``claim``'s."""
    try:
        other = json.loads(path.read_text(encoding="utf-8"))
        other_span = list(other["span"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("removing unreadable lock file %s", path)
        path.unlink(missing_ok=True)
        return
    same_host = other.get("host") == claim["host"]
    if same_host and not _alive(other):
        log.warning(
            "taking over the stale lock of a job that is gone: %s (pid %s, started %s)",
            path,
            other.get("pid"),
            other.get("started"),
        )
        path.unlink(missing_ok=True)
        return
    if not _overlap(other_span, claim["span"]):
        return
    gone = "" if same_host else f"; if that job is gone, delete {path}"
    raise UserError(
        f"{path.parent} is in use by another job: {other.get('job', 'a job')} (pid {other.get('pid')} on "
        f"{other.get('host')}, started {other.get('started')}, {_span_text(other_span)}: "
        f"{other.get('command', '?')}); wait for it to end or choose another {hint}{gone}"
    )
