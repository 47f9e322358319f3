"""What a subcommand declares: its name, its help and example, its own arguments, and its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from flowsubmit.cli.errors import Parser
from flowsubmit.cli.options import common, queue_options

__all__ = ["Command"]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A subcommand that takes only the shared options."""


@dataclass(frozen=True)
class Command:
    """One subcommand; ``add_to`` makes its parser, ``handle`` runs it and returns the exit code.

    Every subcommand takes ``--debug``, and with ``queue_options`` also ``--queue`` and
    ``--config``, before its own arguments; its ``--help`` ends with ``example``.
    """

    name: str
    help: str
    example: str
    handle: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    queue_options: bool = False
    #: The first paragraph of ``--help``; by default ``help`` as a sentence.
    description: str | None = None

    def add_to(self, subcommands: argparse._SubParsersAction[Parser]) -> None:
        """Add this subcommand, with its arguments, to ``flowsubmit``'s subcommands."""
        parents = [common(), queue_options()] if self.queue_options else [common()]
        parser = subcommands.add_parser(
            self.name,
            help=self.help,
            description=self.description or self.help[:1].upper() + self.help[1:] + ".",
            epilog=f"example:\n  {self.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=parents,
        )
        self.add_arguments(parser)
