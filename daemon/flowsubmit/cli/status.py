"""``flowsubmit status``: jobs per folder, the progress and owner of those in processing, queued ids, last rejections."""

from __future__ import annotations

import argparse
import json
import time

from flowsubmit.cli.actions import open_queue
from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_OK, CliError
from flowsubmit.cli.options import load_settings
from flowsubmit.queue.folders import Queue

__all__ = ["STATUS"]


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "job_id",
        metavar="JOB_ID",
        nargs="?",
        help="show this one job: where it is, its summary, its failing runs, its result file",
    )
    parser.add_argument(
        "--watch", action="store_true", help="refresh in place (progress bars on a terminal)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="--watch refresh period (1 s)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (docs/operations.md)"
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from flowsubmit.ops.status import document, render

    settings = load_settings(args)
    queue = open_queue(settings, hint="is it the daemon's --queue?")
    if args.job_id is not None:
        return _one_job(queue, args.job_id, as_json=args.json)
    if args.json:
        print(json.dumps(document(queue, max_job_bytes=settings.max_job_bytes), indent=2))
        return EXIT_OK
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=200)  # whole lines in a pipe
    if not args.watch:
        console.print(
            render(document(queue, max_job_bytes=settings.max_job_bytes), bars=console.is_terminal)
        )
        return EXIT_OK
    if args.interval <= 0:
        raise CliError("status --interval", f"must be above 0, not {args.interval:g}")
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(
                    render(
                        document(queue, max_job_bytes=settings.max_job_bytes),
                        bars=console.is_terminal,
                    ),
                    refresh=True,
                )
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK  # the way to leave --watch


def _one_job(queue: Queue, job_id: str, *, as_json: bool) -> int:
    from flowsubmit.ops.finished import one_job

    job = one_job(queue, job_id)
    if job is None:
        raise CliError(
            f"status {job_id}",
            "no such job in incoming/, processing/, done/, failed/ or rejected/",
            hint="`flowsubmit status` lists the recently finished jobs",
        )
    if as_json:
        print(json.dumps(job, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{job['job_id']}: {job['status']} ({job['where']})")
    for key in ("summary", "error"):
        if job.get(key):
            print(f"  {job[key]}")
    for run in job.get("failing_runs", []):
        where = f"stage {run['stage']} run {run['index']}"
        run_id = str(run["flow_run_id"])[:8] if run["flow_run_id"] else "no run"
        message = f": {run['state_message']}" if run["state_message"] else ""
        print(f"  ❌ {where} ({run_id}) {run['state_name']}{message}")
    if job.get("result"):
        print(f"  result: {job['result']}")
    return EXIT_OK


STATUS = Command(
    "status",
    "jobs per folder, the progress and owner of those in processing, queued ids, last rejections",
    "flowsubmit status --queue /var/spool/flowsubmit --watch",
    _cmd_status,
    _status_arguments,
    queue_options=True,
)
