"""``flowsubmit enqueue``: validate a job, drop it atomically into the queue, print its name there; with ``--wait``, its end."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from functools import partial

from flowsubmit._types import JobStatus
from flowsubmit.cli.actions import (
    ask_prefect,
    drop,
    open_queue,
    refuse_known_id,
    unserved,
    wait_for_end,
)
from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_OK, EXIT_USAGE, CliError
from flowsubmit.cli.files import check_file, policy_problems, print_problems
from flowsubmit.cli.options import load_settings
from flowsubmit.engine.results import JobResult
from flowsubmit.errors import JobRejected
from flowsubmit.jobs.model import PRIORITY_MAX, PRIORITY_MIN
from flowsubmit.jobs.policy import current_producer
from flowsubmit.queue.folders import new_job_id

__all__ = ["ENQUEUE"]

#: The settings that make up the policy: given any of them, ``enqueue`` checks it.
_POLICY_SETTINGS = frozenset(
    {
        "allowed_deployments",
        "allowed_job_variables",
        "producers",
        "allow_prefect_kinds",
        "producer_max_running_jobs",
        "producer_max_runs_in_flight",
        "producer_max_priority",
        "producer_max_timeout_s",
        "producer_default_timeout_s",
    }
)


def _priority(text: str) -> int:
    """``enqueue --priority``: a whole number in the job field's range."""
    try:
        value = int(text)
    except ValueError:
        value = PRIORITY_MAX + 1
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from {PRIORITY_MIN} to {PRIORITY_MAX}, not {text!r}"
        )
    return value


def _enqueue_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="job file, or - for standard input")
    parser.add_argument(
        "--create", action="store_true", help="make the queue directory if it does not exist"
    )
    parser.add_argument(
        "--priority",
        type=_priority,
        metavar="N",
        help=f"set the job's priority ({PRIORITY_MIN} to {PRIORITY_MAX}, higher first; docs/jobs.md)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="ask Prefect first: the deployment exists and every run's parameters fit its schema",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job's end and print its summary; exit 0 only if every run completed",
    )


def _cmd_enqueue(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    queue = open_queue(
        settings, create=args.create, hint="check the path, or give --create to make a new queue"
    )
    # The daemon's policy is known when its settings were given (--config, FLOWSUBMIT_*).
    full = args.config is not None or bool(_POLICY_SETTINGS & settings.model_fields_set)
    checked = check_file(
        args.file, settings, partial(policy_problems, settings=settings, full=full)
    )
    if checked.job is None:
        print_problems(checked.problems)
        return EXIT_USAGE
    job, data = checked.job, checked.data
    if args.check:
        try:
            warnings = asyncio.run(ask_prefect(job))
        except JobRejected as exc:
            raise exc.with_file(checked.file) from None
        for warning in warnings:
            _warn(warning)
    # Give the drop its id now, and print the job's name in the queue (``ID@USER`` for a
    # producer other than the queue's owner): the name the daemon, status and cancel use.
    job_id = job.id or new_job_id()
    me = current_producer()
    name = queue.scoped_id(job_id, me.uid, me.user)
    if job.id is not None:
        refuse_known_id(queue, job_id, checked.file, name)
    if job.id is None or args.priority is not None:
        document = {"id": job_id, **json.loads(data.decode("utf-8-sig"))}
        if args.priority is not None:
            document["priority"] = args.priority
            # The priority asked for on the command line is judged as the file's would be.
            problems = policy_problems(
                job.model_copy(update={"priority": args.priority}), settings, full=full
            )
            if problems:
                print_problems([p.with_file(checked.file) for p in problems])
                return EXIT_USAGE
        data = json.dumps(document, indent=2).encode()
    dropped = drop(queue, data, job_id)
    print(name, flush=True)
    if not args.wait:
        return EXIT_OK
    why = unserved(queue)
    if why is not None:
        _warn(f"{why}; the job waits in incoming/ until a daemon serves this queue")
    return _report_end(name, *wait_for_end(queue, name, dropped))


def _warn(text: str) -> None:
    """One warning line on stderr; the command goes on."""
    print(f"flowsubmit: warning: {text}", file=sys.stderr, flush=True)


def _report_end(job_id: str, folder: str, ended: JobResult | JobRejected) -> int:
    """Print how a waited-for job ended; 0 only if every run completed."""
    if isinstance(ended, JobRejected):
        raise ended
    print(ended.summary.line)
    if ended.status is JobStatus.SUCCEEDED:
        return EXIT_OK
    error = f": {ended.error}" if ended.error else ""
    raise CliError(
        f"job {job_id}", f"{ended.status.value}{error} ({folder}/{job_id}.result.json)", code=1
    )


ENQUEUE = Command(
    "enqueue",
    "validate a job and drop it atomically into the queue; prints its job id",
    "flowsubmit enqueue --queue /var/spool/flowsubmit nightly.json",
    _cmd_enqueue,
    _enqueue_arguments,
    queue_options=True,
)
