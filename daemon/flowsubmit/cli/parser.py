"""``flowsubmit`` itself: its parser, made of every subcommand in the documented order, and ``main``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flowsubmit.cli.cancel import CANCEL
from flowsubmit.cli.command import Command
from flowsubmit.cli.enqueue import ENQUEUE
from flowsubmit.cli.errors import Parser, guarded
from flowsubmit.cli.health import HEALTH
from flowsubmit.cli.options import common
from flowsubmit.cli.prune import PRUNE
from flowsubmit.cli.run import DEMO, RUN
from flowsubmit.cli.status import STATUS
from flowsubmit.cli.validate import SCHEMA, VALIDATE
from flowsubmit.gateway.connection import versions

__all__ = ["COMMANDS", "build_parser", "main"]

#: Every subcommand, in the order of ``flowsubmit --help`` and docs/cli.md.
COMMANDS: tuple[Command, ...] = (
    RUN,
    ENQUEUE,
    VALIDATE,
    STATUS,
    CANCEL,
    HEALTH,
    PRUNE,
    SCHEMA,
    DEMO,
)


def build_parser() -> Parser:
    """The parser of ``flowsubmit``: its own options, then one subparser per command."""
    parser = Parser(
        prog="flowsubmit",
        description="Fan out job files into Prefect deployment runs, and fan their final states back in.",
        epilog=(
            "exit codes: 0 success, 1 runtime failure, 2 bad usage or input (docs/cli.md)\n\n"
            "example:\n  flowsubmit validate jobs/*.json && flowsubmit enqueue --queue /var/spool/flowsubmit jobs/nightly.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common()],
    )
    parser.add_argument(
        "--version",
        action="version",
        version="flowsubmit {} (prefect {})".format(*versions()),
        help="print flowsubmit's and Prefect's versions",
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_to(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 success, 1 runtime failure, 2 bad usage or input)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return guarded(lambda: _dispatch(arguments), debug="--debug" in arguments)


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    (command,) = [c for c in COMMANDS if c.name == args.command]
    return command.handle(args)
