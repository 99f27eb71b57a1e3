"""Plumbing every script shares: logging set-up, worker counts, bad input as one line and exit code 2, and the
argument-parser pieces that read the same in every script (help with defaults, run files, --print_config).

A run file (``--run_file run.yaml``; ``--config_file`` is its older spelling) is a YAML mapping of a
script's flag names (without ``--``) to values. Its values become the parser's defaults before the command
line is parsed, so the command line wins; each value goes through the flag's own type and choices, as if
typed on the command line. argparse has no hook for this, hence the small reader here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError
from utils.io import read_yaml

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
# run folder that holds logs before the first checkpoint, the advice to run under srun whenever an srun
# program exists (vlmdiff.distributed says so itself inside a SLURM job), the DataLoader worker count (ours
# is chosen from the CPUs available, utils.cli.data_workers).
_LIGHTNING_NOISE = ("💡 Tip", "litlogger", "litmodels", "Skipping setting a default `ModelSummary`")
# rank_zero_info logs to whichever of these imported last (the standalone pytorch_lightning package too)
_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)
_NOISE_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",
    r"Checkpoint directory .* exists and is not empty",
    r"The `srun` command is available on your system but is not used",
    r"The '\w+_dataloader' does not have many workers",
)


def _not_noise(record: logging.LogRecord) -> bool:
    return not any(noise in record.getMessage() for noise in _LIGHTNING_NOISE)


def quiet_dependencies() -> None:
    """Hide dependencies' deprecation warnings and Lightning's tips; our own modules' warnings stay.

    In a batch job (standard error not a terminal) the Hugging Face loading and download bars are off too:
    a log keeps each of their redraws. Lightning's messages are printed once (its package logger has a
    console handler of its own; it does not pass them on to ours as well).
    """
    logging.getLogger("lightning").propagate = False
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
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
    original = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
    return original[-1] if original else " ".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's line breaks and shows every flag's default.

    A flag whose default is None (worked out at run time) says in its own help what it defaults to,
    and a required flag has no default to show.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


RUN_FILE_FLAGS = ("run_file", "print_config")


def add_old_spelling(p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str) -> None:
    """Accept ``old`` (a flag's former name, still in users' command lines and run files) for ``new``.

    The old spelling stores into the same destination and is left out of ``--help``, which shows the new name.
    """
    dest = new.lstrip("-")
    p.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_run_file_args(p: argparse.ArgumentParser) -> None:
    """``--run_file`` (also spelt ``--config_file``) and ``--print_config``; parse with :func:`parse_with_run_file`."""
    g = p.add_argument_group("run file")
    g.add_argument(
        "--run_file",
        default=None,
        metavar="RUN_YAML",
        help="YAML mapping of this script's flag names (without --) to values, used as defaults; "
        "flags on the command line win; --print_config writes one (default: none)",
    )
    add_old_spelling(g, "--config_file", "--run_file")
    g.add_argument(
        "--print_config",
        action="store_true",
        help="print the resolved configuration (flags and model config) as YAML and exit without doing work",
    )


def parse_with_run_file(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``p.parse_args(argv)`` with the values of ``--run_file`` (if given) as the parser's defaults."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --config must not pass for --config_file
    pre.add_argument("--run_file", "--config_file", dest="run_file", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.run_file:
        apply_run_file(p, Path(known.run_file))
    return p.parse_args(argv)


def apply_run_file(p: argparse.ArgumentParser, path: Path) -> None:
    """Set ``p``'s defaults from run file ``path``; an unknown flag or a bad value is one :class:`UserError`."""
    by_name = {}
    for action in p._actions:  # argparse keeps its actions only here
        names = [o.lstrip("-") for o in action.option_strings if o.startswith("--")] or [action.dest]
        if action.dest != "help" and action.dest not in RUN_FILE_FLAGS:
            by_name.update({name: action for name in names})
    defaults = {}
    for key, value in read_yaml(path).items():
        action = by_name.get(str(key))
        if action is None:
            raise UserError(
                f"{path}: unknown key '{key}': not a flag of {p.prog} (valid keys: {', '.join(sorted(by_name))})"
            )
        defaults[action.dest] = _flag_value(action, value, f"{path}: key '{key}'")
        action.required = False
    p.set_defaults(**defaults)


def _flag_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from a run file as the command line would give it: the flag's type and choices apply."""
    if action.nargs == 0:  # store_true and the like
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else action.default
    if value is None:
        if action.default is not None:
            raise UserError(f"{where}: null is not a value of this flag (default {action.default!r})")
        return None
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_scalar(action, v, where) for v in value]
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, list) and getattr(action.type, "comma_list", False):  # --devices 0,1 prints as [0, 1]
        value = ",".join(map(str, value))
    if isinstance(value, (list, dict)):
        raise UserError(f"{where}: expected a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError, UserError) as e:
        expected = {int: "an integer", float: "a number"}.get(action.type, f"a valid value ({e})")
        raise UserError(f"{where}: expected {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def print_config(args: argparse.Namespace, **resolved: Any) -> None:
    """``--print_config``: the run's flags and the resolved configs (plain data) as YAML on stdout."""
    flags = {k: _plain(v) for k, v in vars(args).items() if k not in RUN_FILE_FLAGS}
    sys.stdout.write(yaml.safe_dump({"flags": flags, **resolved}, sort_keys=False, default_flow_style=None))


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
