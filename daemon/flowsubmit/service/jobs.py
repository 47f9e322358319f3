"""The jobs one daemon runs: each claimed job's life from its start to its result file and move."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowsubmit import metrics
from flowsubmit._types import JobStatus
from flowsubmit.engine.results import JobResult
from flowsubmit.engine.tracker import Tracker
from flowsubmit.errors import JobRejected
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.ui_links import run_ui_prefix
from flowsubmit.jobs.model import Job
from flowsubmit.jobs.policy import Policy, Producer
from flowsubmit.logs import bound_contextvars, get_logger
from flowsubmit.queue.folders import Claim, Queue
from flowsubmit.service.announcer import Announcer
from flowsubmit.service.executor import Executor
from flowsubmit.settings import Settings

__all__ = ["RunningJobs"]

log = get_logger("flowsubmit.service")


class RunningJobs:
    """Owns the running jobs: the ``job_id -> Task`` registry, their executors and producers, each
    producer's runs in flight, the counters, and how every job ends (result file, move, log line).

    The intake hands it claimed jobs (``start``), rejections (``rejected``) and adopted jobs that
    may not go on (``stop_recovered``), and asks it for room (``has_capacity``); the service opens
    it (``open``) once Prefect answers, and drains it at the stop.
    """

    def __init__(
        self,
        queue: Queue,
        settings: Settings,
        policy: Policy,
        *,
        accepting: Callable[[], bool],
        changed: Callable[[], None],
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.policy = policy
        #: False while nothing may be claimed: stopping, or Prefect known to be down.
        self._accepting = accepting
        #: Called when a job ends (the service updates its status line).
        self._changed = changed
        self.counts = {"claimed": 0, "succeeded": 0, "failed": 0, "rejected": 0, "recovered": 0}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._executors: dict[str, Executor] = {}
        #: The producer uid of each running job, and each producer's runs in flight.
        self._producers: dict[str, int] = {}
        self._run_slots: dict[int, asyncio.Semaphore] = {}
        self._gateway: Gateway | None = None
        self._tracker: Tracker | None = None
        self._tg: asyncio.TaskGroup | None = None
        #: The jobs' ``flowsubmit.job.*`` events on Prefect's feed.
        self.events = Announcer(
            queue.root, events=settings.prefect_events, artifacts=settings.prefect_artifacts
        )

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tasks

    def open(self, gateway: Gateway, tracker: Tracker, tg: asyncio.TaskGroup) -> None:
        """Start taking jobs: they talk to Prefect through ``gateway`` and ``tracker``, in ``tg``."""
        self._gateway, self._tracker, self._tg = gateway, tracker, tg
        self.events.open(gateway)

    # -- asked by the intake ----------------------------------------------------------------

    def has_capacity(self, producer: Producer | None) -> bool:
        """A slot is free for one more job (of ``producer``, within its ``max_running_jobs``)."""
        free = len(self._tasks) < self.settings.max_concurrent_jobs and self._accepting()
        if not free or producer is None:
            return free
        limit = self.policy.limits_for(producer).max_running_jobs
        return limit is None or sum(u == producer.uid for u in self._producers.values()) < limit

    def start(self, claim: Claim, job: Job, producer: Producer, recovered: bool) -> None:
        """Run a claimed (or adopted, ``recovered``) job in the task group."""
        assert self._tg is not None
        self.counts["recovered" if recovered else "claimed"] += 1
        task = self._tg.create_task(
            self._run(claim, job, producer, recovered), name=f"flowsubmit-job-{claim.job_id}"
        )
        self._tasks[claim.job_id] = task
        self._producers[claim.job_id] = producer.uid
        task.add_done_callback(lambda _: self._forget(claim.job_id))

    def rejected(self, error: JobRejected, target: Path) -> None:
        """Count and log one rejection (the file is already in ``rejected/``)."""
        self.counts["rejected"] += 1
        metrics.JOBS.labels("rejected").inc()
        log.warning(
            "job.rejected",
            file=error.file,
            reason=error.reason,
            field=error.field,
            hint=error.hint,
            moved_to=str(target),
        )

    def stop_recovered(self, claim: Claim, error: JobRejected) -> None:
        """End an adopted job that may not go on (its bytes changed, or the policy held now
        refuses it): no further run is created; the runs it created are left to Prefect."""
        log.error("job.stopped", job_id=claim.job_id, reason=error.reason, field=error.field)
        reason = f"{error.reason}; no further run was created"
        self._finish_unrun(claim, claim.state.producer, reason)

    # -- asked by the service -----------------------------------------------------------------

    def deliver_cancel_requests(self) -> None:
        """Cancel the running jobs whose cancel request waits in ``processing/``."""
        for job_id, executor in self._executors.items():
            if self.queue.cancel_requested(job_id):
                executor.cancel()

    def abort_all(self, reason: str) -> None:
        """Fail every running job now (Prefect unreachable beyond ``prefect_outage_tolerance_s``)."""
        for job_id, executor in self._executors.items():
            log.error("job.aborted", job_id=job_id, reason=reason)
            executor.abort(f"{reason} (prefect_outage_tolerance_s)")

    async def drain(self) -> None:
        """Cancel the running jobs and wait for them, bounded by ``drain_timeout_s``; they stay
        in ``processing/`` for the next start."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        await self.events.drain(timeout_s=5.0)

    # -- one job ------------------------------------------------------------------------------

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._producers.pop(job_id, None)
        self._executors.pop(job_id, None)
        self._changed()

    async def _run(self, claim: Claim, job: Job, producer: Producer, recovered: bool) -> None:
        assert self._gateway is not None and self._tracker is not None
        with bound_contextvars(job_id=claim.job_id):
            log.info(
                "job.claimed",
                file=claim.source,
                runs=job.total_runs,
                recovered=recovered,
                producer=producer.as_dict(),
            )
            self.events.claimed(claim.job_id, job, producer, recovered=recovered)
            executor = Executor(
                job,
                claim.job_id,
                gateway=self._gateway,
                tracker=self._tracker,
                journal=claim.journal,
                state=claim.state,
                run_tag=self.settings.run_tag,
                recovered=recovered,
                producer=producer,
                timeout_s=self._timeout_s(job, producer),
                producer_slots=self._producer_slots(producer),
            )
            self._executors[claim.job_id] = executor
            try:
                await self._execute(claim, executor)
            except asyncio.CancelledError:
                claim.release()  # stays in processing/; the next start re-attaches its runs
                raise
            except Exception as exc:
                log.error("job.crashed", error=str(exc), exc_info=exc)
                self._finish_unrun(claim, producer.as_dict(), str(exc))

    async def _execute(self, claim: Claim, executor: Executor) -> None:
        try:
            prepared = await executor.prepare()
        except JobRejected as exc:
            error = exc.with_file(claim.source)
            self.rejected(error, self.queue.reject_claimed(claim, error))
            return
        self._finish(claim, (await executor.run(prepared)).result)

    def _timeout_s(self, job: Job, producer: Producer) -> float | None:
        """The job's ``timeout``, or its producer's ``default_timeout_s`` (then ``max_timeout_s``)."""
        if job.timeout is not None:
            return job.timeout
        return self.policy.limits_for(producer).job_timeout_s

    def _producer_slots(self, producer: Producer) -> asyncio.Semaphore | None:
        """The semaphore of ``producer``'s runs in flight over all its jobs (``max_runs_in_flight``)."""
        limit = self.policy.limits_for(producer).max_runs_in_flight
        if limit is None:
            return None
        return self._run_slots.setdefault(producer.uid, asyncio.Semaphore(limit))

    def _finish_unrun(self, claim: Claim, producer: dict[str, Any] | None, error: str) -> None:
        now = datetime.now(UTC)
        self._finish(
            claim,
            JobResult.of(
                job_id=claim.job_id,
                status=JobStatus.FAILED,
                started_at=now,
                ended_at=now,
                records=[],
                error=error,
                producer=producer,
            ),
        )

    def _finish(self, claim: Claim, result: JobResult) -> None:
        """Write the result and move the job to ``done/`` or ``failed/``; count and log it."""
        succeeded = result.status is JobStatus.SUCCEEDED
        target = self.queue.finish(claim, succeeded, _with_ui_urls(result.document()))
        self.counts["succeeded" if succeeded else "failed"] += 1
        metrics.JOBS.labels(result.status.value).inc()
        self.events.ended(result, target.with_name(f"{claim.job_id}.result.json"))
        fields = {"status": result.status.value, "moved_to": str(target), "error": result.error}
        if succeeded:
            log.info("job.finished", **fields)
        elif result.error and not any(run.flow_run_id for run in result.runs):
            log.error("job.finished", **fields)  # it could not run at all
        else:
            log.warning("job.finished", **fields)


def _with_ui_urls(document: dict[str, Any]) -> dict[str, Any]:
    """The result document with each created run's ``ui_url`` when ``PREFECT_UI_URL`` is set (added as each entry is read)."""
    prefix = run_ui_prefix()  # once: Prefect's settings are a context lookup away
    if prefix is not None:
        document["runs"] = (_with_ui_url(run, prefix) for run in document["runs"])
    return document


def _with_ui_url(run: dict[str, Any], prefix: str) -> dict[str, Any]:
    if run["flow_run_id"]:
        run["ui_url"] = prefix + run["flow_run_id"]
    return run
