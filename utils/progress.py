"""Progress for every stage: a tqdm bar on a terminal, plain log lines at a steady interval elsewhere.

A bar redraws itself with carriage returns, which a batch log (SLURM, nohup, a pipe) keeps as one
endless line or thousands of fragments. When standard error is not a terminal the stages log instead,
every ``interval_s`` seconds and once at the end::

    test: img 120/1725 (7%) | 2.4 s/img | elapsed 4:52 | ETA 1:05:10
    train epoch 3/300: step 120/5000 (2%) | loss 0.0812 | 2.10 step/s | elapsed 0:57 | ETA 38:41

Training (Lightning) uses these lines through a callback in vlmdiff.training; test and captioning call
:func:`progress` around their loops.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0


def is_terminal() -> bool:
    """Whether progress goes to a terminal (standard error, where tqdm and Lightning draw their bars)."""
    return sys.stderr.isatty()


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``2.10 img/s``, or ``8.3 s/img`` below one per second."""
    if count <= 0 or seconds <= 0:
        return f"? {unit}/s"
    rate = count / seconds
    return f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"


class ProgressLines:
    """Counts work done and logs one line every ``interval_s`` seconds (0: every update) and at the end.

    ``total`` None means unknown (no percentage, no ETA). ``start`` is work already done before this
    process began (a resumed run): the rate and the ETA count only what this process does.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str,
        interval_s: float = DEFAULT_INTERVAL_S,
        start: int = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.what, self.total, self.unit, self.interval_s = what, total, unit, interval_s
        self.done = self.start = start
        self.fields: dict[str, Any] = {}
        self.log = logger or log
        self._t0 = self._last = time.monotonic()
        self._logged_at: int | None = None

    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more units done; ``fields`` (e.g. ``loss=0.08``) are shown on the next line."""
        self.set(self.done + n, **fields)

    def due(self) -> bool:
        """Whether the next update logs a line (callers that average values over a line's span)."""
        return time.monotonic() - self._last >= self.interval_s

    def set(self, done: int, what: str | None = None, **fields: Any) -> bool:
        """``done`` units so far (optionally a new ``what``); returns whether a line was logged now."""
        self.done = done
        self.what = what or self.what
        self.fields.update(fields)
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._emit(now)
        return True

    def close(self) -> None:
        """Log the final count unless the last line already showed it."""
        if self._logged_at != self.done:
            self._emit(time.monotonic())

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self._t0
        count = f"{self.unit} {self.done}/{self.total}" if self.total else f"{self.unit} {self.done}"
        if self.total:
            count += f" ({100 * self.done / self.total:.0f}%)"
        parts = [f"{self.what}: {count}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
        ran = self.done - self.start
        parts += [format_rate(ran, elapsed, self.unit), f"elapsed {format_duration(elapsed)}"]
        if self.total:
            left = self.total - self.done
            parts.append(f"ETA {format_duration(left * elapsed / ran if ran > 0 else math.inf)}")
        return " | ".join(parts)

    def _emit(self, now: float) -> None:
        self.log.info("%s", self.line(now))
        self._last, self._logged_at = now, self.done

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: int,
    what: str,
    unit: str,
    *,
    enabled: bool = True,
    bar: bool = True,
    interval_s: float = DEFAULT_INTERVAL_S,
    logger: logging.Logger | None = None,
) -> Any:
    """A tqdm bar on a terminal (when ``bar``), else :class:`ProgressLines`; both have update(n), close()
    and work as context managers. ``enabled`` False: neither (non-main ranks)."""
    from tqdm import tqdm

    if not enabled or (bar and is_terminal()):
        return tqdm(total=total, desc=what, unit=unit, disable=not enabled, dynamic_ncols=True)
    return ProgressLines(what, total, unit, interval_s, logger=logger)


def add_progress_args(p: Any) -> None:
    """``--no_progress_bar`` and ``--log_interval`` for an argparse parser (or argument group)."""
    p.add_argument("--no_progress_bar", action="store_true", help="plain progress lines instead of the bar")
    p.add_argument(
        "--log_interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        help="seconds between plain progress lines, written instead of a bar when the output is not a "
        "terminal or with --no_progress_bar (0: a line per step)",
    )
