"""Plumbing every script shares: logging set-up and turning bad input into one line and exit code 2."""

from __future__ import annotations

import logging
import sys
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
