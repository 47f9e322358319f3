"""``flowsubmit health``: exit 0 when a daemon on this host serves the queue and passed its loop recently, else 1 and why."""

from __future__ import annotations

import argparse

from flowsubmit.cli.actions import open_queue
from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_ERROR, EXIT_OK, CliError
from flowsubmit.cli.options import load_settings

__all__ = ["HEALTH"]


def _cmd_health(args: argparse.Namespace) -> int:
    from flowsubmit.ops.heartbeat import health

    try:
        queue = open_queue(load_settings(args), hint="is it the daemon's --queue?")
    except CliError as exc:  # exit 1, not 2: Docker reserves 2 in a HEALTHCHECK
        raise CliError(exc.what, exc.why, code=EXIT_ERROR, hint=exc.hint) from None
    healthy, line = health(queue.root)
    if not healthy:
        raise CliError("health", line, code=EXIT_ERROR)
    print(line)
    return EXIT_OK


HEALTH = Command(
    "health",
    "exit 0 when a daemon on this host serves the queue and passed its loop recently, else 1 and why",
    "flowsubmit health --queue /var/spool/flowsubmit",
    _cmd_health,
    queue_options=True,
)
