"""The daemon: one class owns the claim loop, the running jobs, recovery, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowsubmit import metrics
from flowsubmit._types import JobStatus
from flowsubmit.engine.results import JobResult
from flowsubmit.engine.tracker import Tracker
from flowsubmit.errors import GatewayError, JobRejected
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.connection import display_url, versions
from flowsubmit.jobs.model import Job
from flowsubmit.jobs.policy import Producer
from flowsubmit.logs import bound_contextvars, get_logger
from flowsubmit.ops import http, retention
from flowsubmit.ops.heartbeat import Heartbeat
from flowsubmit.ops.sdnotify import Notifier
from flowsubmit.queue.crashpoints import CrashPoints
from flowsubmit.queue.folders import FOLDERS, Claim, Queue, job_files
from flowsubmit.queue.watcher import wakeups
from flowsubmit.service.executor import Executor
from flowsubmit.service.intake import SWITCH_INTERVAL_S, Intake
from flowsubmit.service.prefect_health import PrefectHealth
from flowsubmit.settings import Settings, crash_point

__all__ = ["Service"]

log = get_logger("flowsubmit.service")


class Service:
    """Owns the claim loop, the ``job_id -> Task`` registry, the counters and shutdown.

    ``run()`` enters, in order: the gateway (Prefect client), then, once Prefect
    answers, the tracker (event subscription); it tears them down in reverse, so the
    tracker's tasks are cancelled before the client they use is closed.
    """

    def __init__(self, settings: Settings, *, notifier: Notifier | None = None) -> None:
        if settings.queue is None:
            raise ValueError("settings.queue is required to run the daemon")
        self.settings = settings
        self.queue = Queue(settings.queue, crash=CrashPoints(crash_point()))
        self.notifier = notifier or Notifier()
        self._stop = asyncio.Event()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._executors: dict[str, Executor] = {}
        self._intake = Intake(
            self.queue,
            settings,
            has_capacity=self._has_capacity,
            start=self._start_job,
            rejected=self._rejected,
            stopped=self._stop_recovered,
        )
        #: The producer uid of each running job, and each producer's runs in flight.
        self._producers: dict[str, int] = {}
        self._run_slots: dict[int, asyncio.Semaphore] = {}
        self._heartbeat = time.monotonic()
        self.counts = {"claimed": 0, "succeeded": 0, "failed": 0, "rejected": 0, "recovered": 0}
        self._gateway: Gateway | None = None
        self._tracker: Tracker | None = None
        self._health: PrefectHealth | None = None
        #: The task group of the running jobs, while the claim loop runs.
        self._tg: asyncio.TaskGroup | None = None
        self.heartbeat = Heartbeat(self.queue.root, version=versions()[0])

    def __repr__(self) -> str:
        mode = self._tracker.mode.value if self._tracker else "not started"
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return (
            f"<Service queue={self.queue.root} running={len(self._jobs)} tracker={mode} {counts}>"
        )

    def stop(self) -> None:
        """Stop claiming and shut down (what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until ``stop()``; jobs still running stay in ``processing/`` for the next start."""
        os.umask(0o027)
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # the loop waits less for judging threads
        self.queue.ensure()
        if self.queue.others_can_write():
            log.warning("service.queue_writable_by_others", queue=str(self.queue.root))
        if self._intake.policy.launches_anything:
            log.warning(
                "service.any_deployment_allowed",
                allowed_deployments=list(self._intake.policy.allowed_deployments),
                hint="whoever can write to incoming/ may launch any deployment: set allowed_deployments",
            )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self._run_within_drain_timeout()
        finally:
            self.heartbeat.remove()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _run_within_drain_timeout(self) -> None:
        """``_run()``, cut short once ``drain_timeout_s`` has passed since ``stop()``.

        Draining the jobs is bounded by ``_drain``; this also bounds the teardown after it
        (closing the event stream can wait for the server's close frame for 10 s).
        Journal records and renames are synchronous, so cancelling never cuts one in half.
        """
        main = asyncio.create_task(self._run(), name="flowsubmit-service")
        stopping = asyncio.create_task(self._stop.wait(), name="flowsubmit-stop")
        try:
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                await asyncio.wait({main}, timeout=self.settings.drain_timeout_s)
            if not main.done():
                log.warning("service.drain_timeout", timeout_s=self.settings.drain_timeout_s)
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
                return
        finally:
            stopping.cancel()
        await main  # re-raise what ended it, if anything

    async def _run(self) -> None:
        s = self.settings
        async with AsyncExitStack() as stack:
            if s.metrics_port is not None:
                await stack.enter_async_context(
                    http.serve(s.metrics_host, s.metrics_port, self.heartbeat.problem)
                )
            self._gateway = await stack.enter_async_context(
                Gateway(
                    outage_tolerance_s=s.prefect_outage_tolerance_s,
                    max_inflight_submissions=s.max_inflight_submissions,
                    submit_batch_size=s.submit_batch_size,
                )
            )
            self._health = PrefectHealth(
                self._gateway,
                stop=self._stop,
                notifier=self.notifier,
                poll_interval_s=s.poll_interval_s,
                outage_tolerance_s=s.prefect_outage_tolerance_s,
            )
            if not await self._health.wait_until_up(beat=self._beat):
                self.notifier.stopping()  # stopped before Prefect ever answered
                return
            self._tracker = await stack.enter_async_context(
                Tracker(
                    self._gateway,
                    tag=s.run_tag,
                    poll_interval_s=s.poll_interval_s,
                    reconcile_interval_s=s.reconcile_interval_s,
                    resubscribe_max_backoff_s=s.resubscribe_max_backoff_s,
                )
            )
            await self._tracker.wait_connected(timeout_s=10.0)
            self._track_gauges(self._tracker)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                helpers = [
                    tg.create_task(
                        self._health.watch(lambda: len(self._jobs), self._abort_jobs),
                        name="flowsubmit-prefect",
                    ),
                    *self._spawn_watchdog(tg),
                    *self._spawn_retention(tg),
                ]
                try:
                    await self._claim_loop()
                finally:
                    self._intake.close()
                for helper in helpers:
                    helper.cancel()  # a health check in flight must not delay the exit
                await self._drain()
        log.info("service.stopped", **self.counts)

    def _abort_jobs(self, reason: str) -> None:
        for job_id, executor in self._executors.items():
            log.error("job.aborted", job_id=job_id, reason=reason)
            executor.abort(f"{reason} (prefect_outage_tolerance_s)")

    async def _claim_loop(self) -> None:
        ready = False
        async for _ in wakeups(
            self.queue.incoming,
            stop=self._stop,
            rescan_interval_s=self.settings.rescan_interval_s,
            force_polling=self.settings.force_polling,
        ):
            self._heartbeat = time.monotonic()
            await self._intake.adopt_orphans(owned=self._jobs.__contains__)
            self._deliver_cancel_requests()
            await self._intake.scan(self._stop.is_set)
            self._beat(self.settings.rescan_interval_s)
            if not ready:
                ready = True
                # READY=1 first: the log line asks the server its version, and the
                # watchdog must not ping while systemd still waits for READY=1.
                self.notifier.ready(self._status_line())
                await self._log_ready()
            else:
                self.notifier.status(self._status_line())
            if self._stop.is_set():
                break

    async def _log_ready(self) -> None:
        """``service.ready``: what this daemon serves, and what it talks to."""
        assert self._gateway is not None
        try:
            server_version = await self._gateway.server_version()
        except GatewayError:
            server_version = "unknown"
        log.info(
            "service.ready",
            queue=str(self.queue.root),
            tracker=self._tracker.mode.value if self._tracker else None,
            prefect_api_url=display_url(self._gateway.api_url or ""),
            prefect_server_version=server_version,
            version=versions()[0],
            prefect_version=versions()[1],
        )

    async def _drain(self) -> None:
        """Cancel running jobs and wait for them, bounded by ``drain_timeout_s``."""
        self.notifier.stopping()
        log.info("service.stopping", running=len(self._jobs), **self.counts)
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)

    # -- what operators see (docs/metrics.md) -------------------------------------------------

    def _beat(self, every_s: float) -> None:
        """One pass of a loop, which promises the next within ``every_s``: the heartbeat file and
        ``flowsubmit_last_tick_timestamp_seconds``."""
        down = self._health.down_since if self._health else None
        self.heartbeat.beat(
            every_s=every_s,
            tracker=self._tracker.mode.value if self._tracker else None,
            prefect_down_s=None if down is None else time.monotonic() - down,
        )
        metrics.LAST_TICK.set_to_current_time()

    def _track_gauges(self, tracker: Tracker) -> None:
        http.track_gauges(
            in_flight=lambda: tracker.pending,
            streaming=lambda: float(tracker.mode.value == "streaming"),
            queue_files=lambda folder: len(job_files(self.queue.root / folder)),
            folders=[f for f in FOLDERS if f != "tmp"],
        )

    def _spawn_retention(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        days = self.settings.retention_days
        if days is None:
            return []
        task = retention.prune_periodically(self.queue.root, days, self._stop)
        return [tg.create_task(task, name="flowsubmit-retention")]

    def _status_line(self) -> str:
        pending = self._tracker.pending if self._tracker else 0
        return f"{len(self._jobs)} jobs running, {pending} runs tracked, {self.counts['succeeded']} succeeded, {self.counts['failed']} failed"

    # -- claiming -----------------------------------------------------------------------------

    def _has_capacity(self, producer: Producer | None) -> bool:
        """A slot is free for one more job (of ``producer``, within its ``max_running_jobs``)."""
        # Nothing is claimed while Prefect is known to be down: it could not be submitted.
        free = (
            len(self._jobs) < self.settings.max_concurrent_jobs
            and not self._stop.is_set()
            and (self._health is None or self._health.down_since is None)
        )
        if not free or producer is None:
            return free
        limit = self._intake.policy.limits_for(producer).max_running_jobs
        return limit is None or sum(u == producer.uid for u in self._producers.values()) < limit

    def _producer_slots(self, producer: Producer) -> asyncio.Semaphore | None:
        """The semaphore of ``producer``'s runs in flight over all its jobs (``max_runs_in_flight``)."""
        limit = self._intake.policy.limits_for(producer).max_runs_in_flight
        if limit is None:
            return None
        return self._run_slots.setdefault(producer.uid, asyncio.Semaphore(limit))

    def _rejected(self, error: JobRejected, target: Path) -> None:
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

    def _deliver_cancel_requests(self) -> None:
        for job_id, executor in self._executors.items():
            if self.queue.cancel_requested(job_id):
                executor.cancel()

    # -- one job --------------------------------------------------------------------------------

    def _start_job(self, claim: Claim, job: Job, producer: Producer, recovered: bool) -> None:
        assert self._tg is not None
        self.counts["recovered" if recovered else "claimed"] += 1
        task = self._tg.create_task(
            self._run_job(claim, job, producer, recovered), name=f"flowsubmit-job-{claim.job_id}"
        )
        self._jobs[claim.job_id] = task
        self._producers[claim.job_id] = producer.uid
        task.add_done_callback(lambda _: self._forget(claim.job_id))

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._producers.pop(job_id, None)
        self._executors.pop(job_id, None)
        self.notifier.status(self._status_line())

    async def _run_job(self, claim: Claim, job: Job, producer: Producer, recovered: bool) -> None:
        assert self._gateway is not None and self._tracker is not None
        with bound_contextvars(job_id=claim.job_id):
            log.info(
                "job.claimed",
                file=claim.source,
                runs=job.total_runs,
                recovered=recovered,
                producer=producer.as_dict(),
            )
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
                self._finish_crashed(claim, producer, exc)

    async def _execute(self, claim: Claim, executor: Executor) -> None:
        try:
            prepared = await executor.prepare()
        except JobRejected as exc:
            error = exc.with_file(claim.source)
            self._rejected(error, self.queue.reject_claimed(claim, error))
            return
        self._finish(claim, (await executor.run(prepared)).result)

    def _timeout_s(self, job: Job, producer: Producer) -> float | None:
        """The job's ``timeout``, or its producer's ``default_timeout_s`` (then ``max_timeout_s``)."""
        if job.timeout is not None:
            return job.timeout
        return self._intake.policy.limits_for(producer).job_timeout_s

    def _finish_crashed(self, claim: Claim, producer: Producer, exc: Exception) -> None:
        self._finish_unrun(claim, producer.as_dict(), str(exc))

    def _stop_recovered(self, claim: Claim, error: JobRejected) -> None:
        """End an adopted job that may not go on (its bytes changed, or the policy held now
        refuses it): no further run is created; the runs it created are left to Prefect."""
        log.error("job.stopped", job_id=claim.job_id, reason=error.reason, field=error.field)
        reason = f"{error.reason}; no further run was created"
        self._finish_unrun(claim, claim.state.producer, reason)

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
        target = self.queue.finish(claim, succeeded, result.as_dict())
        self.counts["succeeded" if succeeded else "failed"] += 1
        metrics.JOBS.labels(result.status.value).inc()
        fields = {"status": result.status.value, "moved_to": str(target), "error": result.error}
        if succeeded:
            log.info("job.finished", **fields)
        elif result.error and not any(run.flow_run_id for run in result.runs):
            log.error("job.finished", **fields)  # it could not run at all
        else:
            log.warning("job.finished", **fields)

    # -- watchdog ----------------------------------------------------------------------------------

    def _spawn_watchdog(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return []
        stale_after_s = self.settings.rescan_interval_s * 3 + interval
        alive = self.notifier.keep_alive(lambda: self._heartbeat, stale_after_s, self._stop)
        return [tg.create_task(alive, name="flowsubmit-watchdog")]
