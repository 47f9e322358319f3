"""``flowsubmit prune``: remove the files of finished and rejected jobs that ended longer ago than an age."""

from __future__ import annotations

import argparse

from flowsubmit import logs
from flowsubmit.cli.actions import open_queue
from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_OK, CliError
from flowsubmit.cli.options import load_settings

__all__ = ["PRUNE"]


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--older-than", required=True, metavar="AGE", help="e.g. 7d, 12h, 30m (s, m, h, d, w)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")


def _cmd_prune(args: argparse.Namespace) -> int:
    from flowsubmit.ops.retention import parse_age, prune

    try:
        older_than_s = parse_age(args.older_than)
    except ValueError as exc:
        raise CliError("prune --older-than", str(exc)) from None
    queue = open_queue(load_settings(args), hint="is it the daemon's --queue?")
    logs.configure(
        "console", "info", cache=False
    )  # a few lines; and main() may run again in-process
    removed = prune(queue.root, older_than_s, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} job(s), {sum(len(j.files) for j in removed)} file(s)")
    return EXIT_OK


PRUNE = Command(
    "prune",
    "remove the files of finished and rejected jobs that ended longer ago than AGE",
    "flowsubmit prune --queue /var/spool/flowsubmit --older-than 7d --dry-run",
    _cmd_prune,
    _prune_arguments,
    queue_options=True,
)
