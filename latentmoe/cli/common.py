"""What every subcommand shares: the one-line-error parser, numeric option types built from the library's limits,
the device option, and how messages and errors reach the terminal. Torch-free, like ``cli/plan.py``: the planner's
command line runs without torch.

Exit statuses: 0 success; 2 bad input or an expected failure (one ``latentmoe: error: ...`` line naming what is
wrong — an argument, a file, a checkpoint); 1 an internal error (one line too, unless ``--debug`` or
``LATENTMOE_DEBUG=1`` asks for the traceback); 130 / 143 interrupted by SIGINT / SIGTERM after saving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from latentmoe.limits import Limit, field_limit

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "LATENTMOE_DEBUG"
PROG = "latentmoe"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def limited(limit: Limit) -> Callable[[str], int | float]:
    """An argparse ``type=`` that parses a number and enforces ``limit`` with the library's own words."""

    def parse(text: str) -> int | float:
        try:
            value: int | float = int(text) if limit.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if limit.integer else 'a number'}"
            ) from None
        problem = limit.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "integer" if limit.integer else "number"  # argparse names the type in some messages
    parse.limit = limit  # type: ignore[attr-defined]  # what tests read to probe every numeric option
    return parse


def field_type(cls: type, name: str) -> Callable[[str], int | float]:
    """The argparse type of a settings dataclass field with a declared limit (latentmoe.limits)."""
    return limited(field_limit(cls, name))


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Callable[[str], int | float]:
    """An argparse type for a numeric option whose limit lives only on the command line."""
    return limited(Limit(low, high, low_open, high_open, integer))


def positive_int(high: float | None = 2**31 - 1) -> Callable[[str], int | float]:
    return number(1, high, integer=True)


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="auto | cpu | cuda | cuda:N (default auto: the first CUDA device if there is one, else the CPU)",
    )


def add_overwrite_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"allow {what} to hold files latentmoe did not write (they are kept, never removed)",
    )


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _Messages(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{PROG}: {level}{record.getMessage()}"


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and callers may redirect it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def setup_messages() -> None:
    """Library messages (the ``latentmoe`` logger) go to stderr as ``latentmoe: warning: ...`` lines."""
    logger = logging.getLogger(PROG)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Messages())
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
