"""The command line: one module per subcommand (parse, call the library, print). ``latentmoe --help`` lists them.

    train       latentmoe.cli.train       prepare-data  latentmoe.cli.prepare_data
    generate    latentmoe.cli.generate    serve       latentmoe.cli.serve
    eval        latentmoe.cli.eval
    convert     latentmoe.cli.convert     demo        latentmoe.cli.demo
    plan        latentmoe.cli.plan        ep-report   latentmoe.cli.ep_report

Every failure a user can cause (a bad argument, config, checkpoint, file; a full disk, a read-only directory)
ends with one ``latentmoe: error: ...`` line and exit status 2; an unexpected one with one ``internal error``
line and status 1 — ``--debug`` (or ``LATENTMOE_DEBUG=1``) shows the traceback instead. SIGINT / SIGTERM during
training save a checkpoint and exit with 130 / 143 (latentmoe.cli.common).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from latentmoe.cli.common import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    OneLineErrorParser,
    debug_requested,
    setup_messages,
)

SUBCOMMANDS = ("train", "prepare_data", "generate", "serve", "eval", "convert", "demo", "ep_report", "plan")


def build_parser() -> OneLineErrorParser:
    import importlib

    from latentmoe import __version__

    parser = OneLineErrorParser(
        prog=PROG,
        description="Train, sample, convert and plan DeepSeek-V3-style models (MLA, DeepSeekMoE, MTP).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"latentmoe.cli.{name}")
        if name == "plan":
            module.add_plan_subcommand(sub)
        else:
            module.add_parser(sub)
    _accept_debug(parser)
    return parser


def _accept_debug(parser) -> None:
    """``--debug`` is accepted after any (sub)command too."""
    import argparse

    if not any("--debug" in a.option_strings for a in parser._actions):
        parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                _accept_debug(choice)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a failure the user can act on, reported as one line."""
    from latentmoe.checkpoint import CheckpointError
    from latentmoe.config import ConfigError
    from latentmoe.io import DestinationError
    from latentmoe.parallel.runtime import CollectiveError
    from latentmoe.plan import PlanError
    from latentmoe.train import RunDirectoryError, TrainingError

    return (ConfigError, CheckpointError, TrainingError, RunDirectoryError, CollectiveError, DestinationError,
            PlanError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    from latentmoe.io import one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    setup_messages()
    from latentmoe.train import TrainingInterrupted

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as exc:
        from latentmoe.parallel.runtime import env_world

        if env_world()[0] == 0:  # under torchrun every rank stopped at the same step: rank 0 says so
            where = f"; checkpoint saved at {exc.checkpoint}" if exc.checkpoint else ""
            print(f"{PROG}: interrupted at step {exc.step}{where} (resume with --resume)", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except expected_errors() as exc:
        if debug:
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL
