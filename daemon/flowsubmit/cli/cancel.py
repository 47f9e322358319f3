"""``flowsubmit cancel``: a job still in incoming/ at once (no run is created), a running one by its daemon."""

from __future__ import annotations

import argparse
import time

from flowsubmit.cli.actions import cancel, open_queue, wait_for_end
from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_OK
from flowsubmit.cli.options import load_settings
from flowsubmit.errors import JobRejected
from flowsubmit.queue.folders import Queue

__all__ = ["CANCEL"]


def _cancel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", metavar="JOB_ID")
    parser.add_argument(
        "--wait", action="store_true", help="wait until the job has ended and print its summary"
    )


def _cmd_cancel(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    queue = open_queue(settings, hint="is it the daemon's --queue?")
    print(cancel(queue, args.job_id, settings.max_job_bytes), flush=True)
    if not args.wait:
        return EXIT_OK
    folder, ended = wait_for_end(queue, args.job_id)
    _wait_for_request_cleared(queue, args.job_id)
    print(f"ended in {folder}/" if isinstance(ended, JobRejected) else ended.summary.line)
    return EXIT_OK


def _wait_for_request_cleared(queue: Queue, job_id: str, timeout_s: float = 5.0) -> None:
    """Wait briefly for the daemon to remove the handled request: it does so right after the
    job's move to ``done/`` or ``failed/``, the moment ``wait_for_end`` returns."""
    deadline = time.monotonic() + timeout_s
    while queue.cancel_requested(job_id) and time.monotonic() < deadline:
        time.sleep(0.05)


CANCEL = Command(
    "cancel",
    "cancel a job: one still in incoming/ at once (no run is created), a running one by the daemon",
    "flowsubmit cancel --queue /var/spool/flowsubmit nightly-tables-2026-11-26",
    _cmd_cancel,
    _cancel_arguments,
    queue_options=True,
)
