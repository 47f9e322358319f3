"""What the commands do to a queue: open it (or refuse the path), drop a job, ask Prefect first, wait for a job's end, cancel a job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowsubmit._types import Deployment, JobStatus
from flowsubmit.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, CliError
from flowsubmit.engine.results import JobResult
from flowsubmit.errors import (
    AuthenticationError,
    ClaimLost,
    JobRejected,
    TransientGatewayError,
)
from flowsubmit.jobs.model import Job
from flowsubmit.queue.folders import DEFAULT_MAX_JOB_BYTES, FOLDERS, Queue
from flowsubmit.settings import Settings

__all__ = [
    "ask_prefect",
    "cancel",
    "drop",
    "open_queue",
    "refuse_known_id",
    "unserved",
    "wait_for_end",
]

#: How long ``enqueue --check`` waits for Prefect's answers before it gives up (exit 1).
CHECK_TIMEOUT_S = 30.0
#: Period of the look at the queue while ``--wait`` waits for a job's end.
WAIT_POLL_S = 0.2
#: How long ``cancel`` keeps trying while a daemon is claiming the job at the same moment.
CANCEL_RACE_S = 5.0


def open_queue(settings: Settings, *, create: bool = False, hint: str | None = None) -> Queue:
    """The queue named by the settings, checked to be one; ``create`` makes what is missing.

    Raises:
        CliError: no queue given, or a path that is not a queue directory (exit 2), or
            one that may not be created (exit 1).
    """
    root = settings.queue
    if root is None:
        raise CliError(
            "--queue", "no queue directory given", hint="give --queue DIR or set FLOWSUBMIT_QUEUE"
        )
    queue = Queue(root)
    if create:
        _create(queue)
    if not root.is_dir():
        why = "is not a directory" if root.exists() else "does not exist"
        raise CliError(f"queue {root}", why, hint=hint)
    for name in FOLDERS:
        folder = root / name
        if not folder.is_dir():
            why = (
                f"{name}/ is not a directory"
                if folder.exists()
                else f"is not a queue directory (it has no {name}/)"
            )
            raise CliError(f"queue {root}", why, hint=hint)
    return queue


def _create(queue: Queue) -> None:
    try:
        queue.ensure()
    except (FileExistsError, NotADirectoryError) as exc:
        raise CliError(
            f"queue {queue.root}", f"{Path(exc.filename).name}/ is not a directory"
        ) from exc
    except PermissionError as exc:
        raise CliError(
            f"queue {queue.root}",
            f"may not create {exc.filename} (permission denied)",
            code=EXIT_ERROR,
        ) from exc


def refuse_known_id(queue: Queue, job_id: str, file: str, name: str | None = None) -> None:
    """Refuse, now rather than into rejected/ later, an id of this producer's that waits in incoming/, runs, or ran.

    ``name`` is the job's name in the queue (``ID@USER`` for a producer other than the
    queue's owner); another producer's job of the same id is not this one.

    Raises:
        JobRejected: naming where the id already is (exit 2).
    """
    try:
        queue.refuse_duplicate(name or job_id)
    except JobRejected as exc:
        raise exc.with_file(file) from None
    if queue.waiting(name or job_id, by_content=False) is not None:
        raise JobRejected(
            f"duplicate job id: {job_id!r} is already waiting in incoming/",
            file=file,
            field="id",
            hint="an id makes a job exactly-once: the daemon would reject the second drop",
        )


def drop(queue: Queue, data: bytes, job_id: str) -> str:
    """Drop a job: written into tmp/, then one rename into incoming/; returns the name it has there.

    Raises:
        CliError: the queue may not be written (exit 1).
    """
    try:
        return queue.enqueue(data, job_id).name
    except PermissionError as exc:
        raise CliError(
            f"queue {queue.root}",
            f"may not write in {Path(exc.filename).parent.name}/ (permission denied)",
            code=EXIT_ERROR,
            hint="producers need write access to tmp/ and incoming/",
        ) from exc


async def ask_prefect(job: Job) -> list[str]:
    """Make the daemon's own pre-submit check (``executor.prepare``) now, against Prefect;
    returns warnings: each deployment that no worker or runner has polled lately.

    Raises:
        JobRejected: unknown deployment, parameters the flow refuses, unknown work queue (exit 2).
        CliError: Prefect does not answer within ``CHECK_TIMEOUT_S``, or refuses the
            credentials (exit 1): a fault of the setup, not of the job, said at once.
    """
    from flowsubmit.gateway.client import Gateway
    from flowsubmit.service.executor import prepare

    unreachable = CliError(
        "Prefect",
        "its API does not answer",
        code=EXIT_ERROR,
        hint="is PREFECT_API_URL right, and the server up? (enqueue without --check drops anyway)",
    )
    async with Gateway(outage_tolerance_s=CHECK_TIMEOUT_S / 2) as gateway:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                if not await gateway.healthy():
                    raise unreachable
                # Checked apart, with no retries: the reads of `prepare` would wait a
                # refusal out like an outage, for the whole timeout.
                await gateway.check_credentials()
                checked = await prepare(job, gateway)
        except AuthenticationError as exc:
            raise CliError(
                "Prefect",
                str(exc).removeprefix("check credentials: "),
                code=EXIT_ERROR,
                hint="the job was not enqueued",
            ) from None
        except (TimeoutError, TransientGatewayError):
            raise unreachable from None
    return _not_ready({deployment.name: deployment for _, deployment in checked}.values())


def _not_ready(deployments: Iterable[Deployment]) -> list[str]:
    """A warning per deployment Prefect calls ``NOT_READY``: its runs would wait Scheduled."""
    return [
        f"deployment {d.name!r} is NOT_READY in Prefect: no worker or runner has polled"
        f" {f'work pool {d.work_pool_name!r}' if d.work_pool_name else 'it'} lately, so its"
        " runs will wait Scheduled (then Late) until one does"
        for d in deployments
        if d.status == "NOT_READY"
    ]


def unserved(queue: Queue) -> str | None:
    """Why no daemon on this host serves ``queue`` (its heartbeat files), or None if one does."""
    from flowsubmit.ops.heartbeat import health

    healthy, why = health(queue.root)
    return None if healthy else why


def wait_for_end(
    queue: Queue, job_id: str, file: str | None = None
) -> tuple[str, JobResult | JobRejected]:
    """Wait until the job has ended; (folder, its result or why it was rejected).

    Raises:
        CliError: interrupted by Ctrl-C (exit 130); the job goes on.
        ValueError: its result file is not a result document.
    """
    try:
        while (ended := queue.outcome(job_id, file)) is None:
            time.sleep(WAIT_POLL_S)
    except KeyboardInterrupt:
        raise CliError(
            "interrupted",
            f"stopped waiting for {job_id}; the job itself goes on",
            code=EXIT_INTERRUPTED,
        ) from None
    folder, document = ended
    return folder, _rejection(document) if folder == "rejected" else JobResult.from_dict(document)


def _rejection(error: dict[str, Any]) -> JobRejected:
    """The rejection a ``.error.json`` document records."""
    return JobRejected(
        str(error.get("reason")),
        file=str(error.get("file")),
        field=error.get("field"),
        hint=error.get("hint"),
    )


def cancel(queue: Queue, job_id: str, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES) -> str:
    """Cancel job ``job_id`` wherever it is; returns what happened, in words.

    A job still in incoming/ is claimed exactly as the daemon claims (its lock, then one
    rename), so the two can never both take it, and finished at once as ``cancelled``
    in failed/: no run is created. A job in processing/ gets a cancel request for the
    daemon that owns it. While a daemon is claiming the same job, this tries again.

    Raises:
        CliError: no such job, or it has ended already (not cancelled).
    """
    try:
        return _cancel(queue, job_id, max_job_bytes)
    except PermissionError:
        raise CliError(
            f"cancel {job_id}",
            "permission denied: only the daemon's user (or root) may cancel a job",
            code=EXIT_ERROR,
            hint="ask the queue's operator; a job still waiting in incoming/ is yours to remove",
        ) from None


def _cancel(queue: Queue, job_id: str, max_job_bytes: int) -> str:
    deadline, misses = time.monotonic() + CANCEL_RACE_S, 0
    while time.monotonic() < deadline:
        ended = queue.outcome(job_id)
        if ended is not None:
            return _already_ended(job_id, *ended)
        name = queue.waiting(job_id, max_bytes=max_job_bytes)
        if name is not None:
            try:
                return _cancel_waiting(queue, name, job_id)
            except ClaimLost:
                pass  # a daemon holds or took it this very moment: look again
        elif queue.request_cancel(job_id):
            return f"cancel requested for {job_id}"
        else:
            misses += 1  # once more: it may have moved on between two looks
            if misses > 1:
                break
        time.sleep(0.05)
    raise CliError(
        f"cancel {job_id}",
        "no such job in incoming/, processing/, done/, failed/ or rejected/",
        hint="`flowsubmit status` counts the jobs of each folder",
    )


def _cancel_waiting(queue: Queue, name: str, job_id: str) -> str:
    claim = queue.claim(name, job_id)
    now = datetime.now(UTC)
    result = JobResult.of(
        job_id=job_id,
        status=JobStatus.CANCELLED,
        started_at=now,
        ended_at=now,
        records=[],
        error="cancelled before it started (flowsubmit cancel): no run was created",
    )
    queue.finish(claim, False, result.as_dict())
    return f"cancelled {job_id} before it started: no run was created (failed/{job_id}.result.json)"


def _already_ended(job_id: str, folder: str, document: dict[str, Any]) -> str:
    # Only the status is read, not the whole result: cancel answers for any job that has
    # ended, whatever else its file holds.
    if document.get("status") == JobStatus.CANCELLED.value:
        return f"{job_id} is already cancelled ({folder}/{job_id}.result.json)"
    how = "was rejected" if folder == "rejected" else f"has already ended: {document.get('status')}"
    raise CliError(f"cancel {job_id}", f"the job {how} ({folder}/)", code=EXIT_ERROR)
