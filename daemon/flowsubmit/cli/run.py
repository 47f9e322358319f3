"""``flowsubmit run`` (the daemon in the foreground) and ``flowsubmit demo`` (the daemon beside a local Prefect server)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from flowsubmit import logs
from flowsubmit.cli.actions import open_queue
from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_INTERRUPTED, EXIT_OK, CliError
from flowsubmit.cli.options import add_settings_flags, load_settings
from flowsubmit.gateway.connection import configured_api_url

__all__ = ["DEMO", "RUN"]


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    open_queue(settings, create=True)
    configured_api_url()  # refuse before anything could start Prefect's temporary server
    from flowsubmit.service.daemon import (
        Service,  # Prefect is imported only once the arguments are good
    )

    logs.configure(settings.log_format, settings.log_level)
    asyncio.run(Service(settings).run())
    return EXIT_OK


RUN = Command(
    "run",
    "run the daemon in the foreground",
    "PREFECT_API_URL=http://127.0.0.1:4200/api flowsubmit run --queue /var/spool/flowsubmit",
    _cmd_run,
    add_settings_flags,
    queue_options=True,
)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        type=int,
        default=20,
        metavar="N",
        help="runs in the example job (default: 20)",
    )
    parser.add_argument(
        "--log-format", choices=["json", "console"], default="json", help="the daemon's log format"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary queue (with the result file) instead of removing it",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from flowsubmit.cli.demo import run_demo

    if args.runs < 1:
        raise CliError("demo --runs", f"must be at least 1, not {args.runs}")
    try:
        return run_demo(runs=args.runs, log_format=args.log_format, keep=args.keep)
    except KeyboardInterrupt:
        print("interrupted: everything the demo started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


DEMO = Command(
    "demo",
    "start a local Prefect server, serve an example flow, run the daemon and one example job",
    "flowsubmit demo --runs 8",
    _cmd_demo,
    _demo_arguments,
    description=(
        "Starts a local Prefect server (SQLite in a temporary home, loopback only), serves the\n"
        "example flow process-table-etl, runs the daemon on a temporary queue, enqueues one job\n"
        "of N runs (tables 1 to N; tables 7 and 17, when N reaches them, fail on purpose),\n"
        "prints the daemon's logs and the summary, then stops everything it started.\n"
        "The queue, with the result file, is kept."
    ),
)
