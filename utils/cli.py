"""Plumbing every script shares: logging set-up, worker counts, and turning bad input into one line and exit code 2."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable, Sequence

from utils.errors import UserError

EXIT_BAD_INPUT = 2


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once for a script run (library modules only call getLogger)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    quiet_dependencies()


# Lightning notices that help nobody running these scripts: its advertisements, the note that our one-line
# model summary replaces its table, the eval-mode count (the frozen parts are in eval mode on purpose), the
# run folder that holds logs before the first checkpoint.
_LIGHTNING_NOISE = ("💡 Tip", "litlogger", "litmodels", "Skipping setting a default `ModelSummary`")
# rank_zero_info logs to whichever of these imported last (the standalone pytorch_lightning package too)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "pytorch_lightning.utilities.rank_zero")
_NOISE_WARNINGS = (r"Found \d+ module\(s\) in eval mode", r"Checkpoint directory .* exists and is not empty")


def _not_noise(record: logging.LogRecord) -> bool:
    return not any(noise in record.getMessage() for noise in _LIGHTNING_NOISE)


def quiet_dependencies() -> None:
    """Hide dependencies' deprecation warnings and Lightning's tips; our own modules' warnings stay."""
    for name in _RANK_ZERO_LOGGERS:
        rank_zero = logging.getLogger(name)
        if _not_noise not in rank_zero.filters:
            rank_zero.addFilter(_not_noise)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!(ldm|vlmdiff|utils|__main__)(\.|$))")
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def available_cpus() -> int:
    """CPUs this process may run on (the job's allocation under SLURM or taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def data_workers(requested: int | None, default: int) -> int:
    """DataLoader worker processes: ``requested`` when given, else ``default`` capped at the available CPUs."""
    return requested if requested is not None else min(default, available_cpus())


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Call a script's ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit 2.

    Scripts end with ``sys.exit(run_main(main))``; tests call ``main(args)`` directly and see the
    exception itself.
    """
    try:
        main(argv)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def one_line(e: UserError) -> str:
    """The message of ``e`` on one line.

    A :class:`UserError` raised in a DataLoader worker process is re-raised in the main process by
    torch with the worker's whole traceback as its message; only the original message (the
    traceback's last ``utils.errors.UserError: ...`` line) is kept.
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    original = [line[len(prefix):] for line in lines if line.startswith(prefix)]
    return original[-1] if original else " ".join(lines)
