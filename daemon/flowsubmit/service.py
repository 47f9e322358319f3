"""The daemon: one class owns the claim loop, the running jobs, recovery, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog
from structlog.contextvars import bound_contextvars

from flowsubmit._aio import wait_event
from flowsubmit._types import JobStatus
from flowsubmit.errors import ClaimLost, GatewayError, JobRejected
from flowsubmit.executor import Executor
from flowsubmit.faults import CrashPoints
from flowsubmit.gateway import Gateway
from flowsubmit.jobs import Job, parse_job
from flowsubmit.queue import Candidate, Claim, Queue, new_job_id, printable_name
from flowsubmit.results import result_document
from flowsubmit.sdnotify import Notifier
from flowsubmit.settings import Settings, crash_point
from flowsubmit.tracker import Tracker
from flowsubmit.watcher import wakeups

__all__ = ["Service"]

log = structlog.get_logger("flowsubmit.service")

#: The scan hands the event loop back after this many files, so running jobs go on during a flood.
_YIELD_EVERY = 50
#: Time one scan may spend rejecting (three fsyncs each); the rest waits for the next scan, so a
#: slot freed meanwhile goes to a good job first (the moves wake the watcher at once).
_REJECT_BUDGET_S = 0.5


@dataclass(slots=True)
class _Verdict:
    """What judging a file of ``incoming/`` found; valid while the file is unchanged."""

    candidate: Candidate
    #: Why the file is refused, or None for a good job waiting for a free slot.
    error: JobRejected | None
    #: When this exact file (name, size, mtime, inode) was first seen, on the monotonic clock.
    since: float


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
        #: Verdicts on the files of incoming/ (pruned on every scan); owned by _scan.
        self._verdicts: dict[str, _Verdict] = {}
        #: Files whose judging raised (logged once per version of the file).
        self._broken: dict[str, Candidate] = {}
        self._heartbeat = time.monotonic()
        self.counts = {"claimed": 0, "succeeded": 0, "failed": 0, "rejected": 0, "recovered": 0}
        self._gateway: Gateway | None = None
        self._tracker: Tracker | None = None
        #: When Prefect stopped answering (monotonic), or None while it answers.
        self._prefect_down_since: float | None = None

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
        self.queue.ensure()
        if self.queue.others_can_write():
            log.warning("service.queue_writable_by_others", queue=str(self.queue.root))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self._run_within_drain_timeout()
        finally:
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
            self._gateway = await stack.enter_async_context(
                Gateway(
                    outage_tolerance_s=s.prefect_outage_tolerance_s,
                    max_inflight_submissions=s.max_inflight_submissions,
                    submit_batch_size=s.submit_batch_size,
                )
            )
            if not await self._wait_for_prefect(self._gateway):
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
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(self._watch_prefect(self._gateway), name="flowsubmit-prefect"),
                    *self._spawn_watchdog(tg),
                ]
                await self._claim_loop(tg)
                for helper in helpers:
                    helper.cancel()  # a health check in flight must not delay the exit
                await self._drain()
        log.info("service.stopped", **self.counts)

    async def _wait_for_prefect(self, gateway: Gateway) -> bool:
        """Health-check Prefect with backoff until it answers; False if stopped first.

        systemd arms the watchdog at start-up, not at READY=1, so waiting pings it too
        (waiting for Prefect is progress), and the backoff never outgrows its interval.
        """
        delay, max_delay_s = 0.5, min(30.0, self.notifier.watchdog_interval_s or 30.0)
        while not self._stop.is_set():
            if await _answers(gateway, timeout_s=min(5.0, max_delay_s)):
                return True
            log.warning("service.waiting_for_prefect", retry_in_s=round(delay, 1))
            self.notifier.notify("WATCHDOG=1", "STATUS=waiting for Prefect")
            await self._sleep(delay)
            delay = min(delay * 2, max_delay_s)
        return False

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once on ``stop()``."""
        await wait_event(self._stop, seconds)

    async def _watch_prefect(self, gateway: Gateway) -> None:
        """One health check per ``poll_interval_s``: stop claiming while Prefect is down, and
        fail the running jobs once it has been down longer than ``prefect_outage_tolerance_s``.

        Submissions fail by themselves (the gateway's retries are bounded by the same
        tolerance); this covers jobs that only wait for final states, which the tracker
        would otherwise wait for forever.
        """
        tolerance_s = self.settings.prefect_outage_tolerance_s
        period_s = min(self.settings.poll_interval_s, tolerance_s / 2)
        while not self._stop.is_set():
            if await _answers(gateway, timeout_s=max(period_s, 1.0)):
                self._prefect_back()
            elif self._prefect_down_since is None:
                self._prefect_down_since = time.monotonic()
                log.warning("service.prefect_unreachable", running=len(self._jobs))
            elif time.monotonic() - self._prefect_down_since > tolerance_s:
                self._abort_jobs(f"Prefect unreachable for more than {tolerance_s:g} s")
            await self._sleep(period_s)

    def _prefect_back(self) -> None:
        if self._prefect_down_since is not None:
            down_s = time.monotonic() - self._prefect_down_since
            log.info("service.prefect_reachable", down_s=round(down_s, 1))
        self._prefect_down_since = None

    def _abort_jobs(self, reason: str) -> None:
        for job_id, executor in self._executors.items():
            log.error("job.aborted", job_id=job_id, reason=reason)
            executor.abort(f"{reason} (prefect_outage_tolerance_s)")

    async def _claim_loop(self, tg: asyncio.TaskGroup) -> None:
        ready = False
        async for _ in wakeups(
            self.queue.incoming,
            stop=self._stop,
            rescan_interval_s=self.settings.rescan_interval_s,
            force_polling=self.settings.force_polling,
        ):
            self._heartbeat = time.monotonic()
            self._adopt_orphans(tg)
            self._deliver_cancel_requests()
            await self._scan(tg)
            if not ready:
                ready = True
                log.info(
                    "service.ready",
                    queue=str(self.queue.root),
                    tracker=self._tracker.mode.value if self._tracker else None,
                )
                self.notifier.ready(self._status_line())
            else:
                self.notifier.status(self._status_line())
            if self._stop.is_set():
                break

    async def _drain(self) -> None:
        """Cancel running jobs and wait for them, bounded by ``drain_timeout_s``."""
        self.notifier.stopping()
        log.info("service.stopping", running=len(self._jobs), **self.counts)
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)

    def _status_line(self) -> str:
        pending = self._tracker.pending if self._tracker else 0
        return f"{len(self._jobs)} jobs running, {pending} runs tracked, {self.counts['succeeded']} succeeded, {self.counts['failed']} failed"

    # -- claiming -----------------------------------------------------------------------------

    def _has_capacity(self) -> bool:
        # Nothing is claimed while Prefect is known to be down: it could not be submitted (#5).
        return (
            len(self._jobs) < self.settings.max_concurrent_jobs
            and not self._stop.is_set()
            and self._prefect_down_since is None
        )

    async def _scan(self, tg: asyncio.TaskGroup) -> None:
        """Judge every file of ``incoming/``, oldest first, then reject the bad ones that have settled.

        A verdict is remembered while its file is unchanged, so a rescan of thousands
        of waiting files reads only the new or changed ones. Bad files are judged even
        when no slot is free, and rejected (three fsyncs each) only after the pass that
        claims, and for at most ``_REJECT_BUDGET_S`` per scan, so good jobs never wait
        behind bad ones (#6). The loop yields every ``_YIELD_EVERY`` files so that
        running jobs go on during a flood.
        """
        candidates = self.queue.scan()
        to_reject: list[str] = []
        for i, candidate in enumerate(candidates):
            if self._stop.is_set():
                return
            if self._guarded(candidate, partial(self._judge, candidate, tg)):
                to_reject.append(candidate.name)
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
        present = {c.name for c in candidates}
        for cache in (self._verdicts, self._broken):
            for name in [n for n in cache if n not in present]:
                del cache[name]
        deadline = time.monotonic() + _REJECT_BUDGET_S
        for i, name in enumerate(to_reject):
            if time.monotonic() > deadline:
                return
            verdict = self._verdicts[name]
            self._guarded(verdict.candidate, partial(self._reject, verdict))
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)

    def _guarded(self, candidate: Candidate, judge: Callable[[], bool | None]) -> bool:
        """Run one file's judging; a bug or an I/O error is logged (once per version) and skipped."""
        try:
            return bool(judge())
        except Exception as exc:  # one file must never stop the daemon or the other files
            if self._broken.get(candidate.name) != candidate:
                self._broken[candidate.name] = candidate
                log.error(
                    "job.judge_failed",
                    file=printable_name(candidate.name),
                    error=str(exc),
                    exc_info=exc,
                )
            return False

    def _judge(self, candidate: Candidate, tg: asyncio.TaskGroup) -> bool:
        """Claim a good job when a slot is free; True when the file is bad and has settled."""
        known = self._verdicts.get(candidate.name)
        if known is None or known.candidate != candidate:
            known = _Verdict(candidate, None, time.monotonic())
        elif known.error is None and not self._has_capacity():
            return False  # a good job, read before: it waits for a free slot unread
        if known.error is None:
            known.error = self._try_claim(candidate, tg)
            if known.error is None:
                return False
        self._verdicts[candidate.name] = known
        return self._settled(known)

    def _try_claim(self, candidate: Candidate, tg: asyncio.TaskGroup) -> JobRejected | None:
        """Read, parse and claim the file; the rejection when it is bad, else None."""
        name = candidate.name
        try:
            data = self.queue.read(name, self.settings.max_job_bytes)
            job = parse_job(data, file=name, max_runs=self.settings.max_runs_per_job)
            if not self._has_capacity():
                self._verdicts[name] = _Verdict(candidate, None, time.monotonic())
                return None
            claim = self.queue.claim(name, job.id or new_job_id())
        except ClaimLost:
            self._verdicts.pop(name, None)  # gone, or its id is running right now: look again later
            return None
        except JobRejected as exc:
            return exc.with_file(printable_name(name))
        self._verdicts.pop(name, None)
        self.counts["claimed"] += 1
        self._start_job(claim, job, tg, recovered=False)
        return None

    def _settled(self, verdict: _Verdict) -> bool:
        """True once the file has stayed unchanged for ``settle_s``: a bad file still being written is never rejected.

        Unchanged means this daemon saw the same size, mtime and inode for ``settle_s``,
        or the mtime is at least twice ``settle_s`` old (a file that sat there before the
        daemon started is judged on the first scan).
        """
        settle_s = self.settings.settle_s
        seen_s = time.monotonic() - verdict.since
        age_s = time.time() - verdict.candidate.mtime_ns / 1e9
        return seen_s >= settle_s or age_s >= 2 * settle_s

    def _reject(self, verdict: _Verdict) -> None:
        name, error = verdict.candidate.name, verdict.error
        assert error is not None
        self._verdicts.pop(name, None)
        try:
            target = self.queue.reject(name, error)
        except FileNotFoundError:
            return  # another daemon moved it first
        self._rejected(error, target)

    def _rejected(self, error: JobRejected, target: Path) -> None:
        """Count and log one rejection (the file is already in ``rejected/``)."""
        self.counts["rejected"] += 1
        log.warning(
            "job.rejected",
            file=error.file,
            reason=error.reason,
            field=error.field,
            hint=error.hint,
            moved_to=str(target),
        )

    def _adopt_orphans(self, tg: asyncio.TaskGroup) -> None:
        """Resume ``processing/`` jobs whose owner is gone (this daemon before a crash, or a dead peer)."""
        for job_id in self.queue.retire_stranded():
            log.info("job.journal_retired", job_id=job_id)
        for job_id in self.queue.orphans():
            if job_id in self._jobs or not self._has_capacity():
                continue
            try:
                claim = self.queue.adopt(job_id)
            except ClaimLost:
                continue
            try:
                job = parse_job(
                    claim.path.read_bytes(),
                    file=claim.path.name,
                    max_runs=self.settings.max_runs_per_job,
                )
            except JobRejected as exc:
                self.queue.reject_claimed(claim, exc)
                continue
            self.counts["recovered"] += 1
            self._start_job(claim, job, tg, recovered=True)

    def _deliver_cancel_requests(self) -> None:
        for job_id, executor in self._executors.items():
            if self.queue.cancel_requested(job_id):
                executor.cancel()

    # -- one job --------------------------------------------------------------------------------

    def _start_job(self, claim: Claim, job: Job, tg: asyncio.TaskGroup, *, recovered: bool) -> None:
        task = tg.create_task(
            self._run_job(claim, job, recovered), name=f"flowsubmit-job-{claim.job_id}"
        )
        self._jobs[claim.job_id] = task
        task.add_done_callback(lambda _: self._forget(claim.job_id))

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._executors.pop(job_id, None)
        self.notifier.status(self._status_line())

    async def _run_job(self, claim: Claim, job: Job, recovered: bool) -> None:
        assert self._gateway is not None and self._tracker is not None
        with bound_contextvars(job_id=claim.job_id):
            log.info("job.claimed", file=claim.source, runs=job.total_runs, recovered=recovered)
            executor = Executor(
                job,
                claim.job_id,
                gateway=self._gateway,
                tracker=self._tracker,
                journal=claim.journal,
                state=claim.state,
                run_tag=self.settings.run_tag,
                recovered=recovered,
            )
            self._executors[claim.job_id] = executor
            try:
                await self._execute(claim, executor)
            except asyncio.CancelledError:
                claim.release()  # stays in processing/; the next start re-attaches its runs
                raise
            except Exception as exc:
                log.error("job.crashed", error=str(exc), exc_info=exc)
                self._finish_crashed(claim, exc)

    async def _execute(self, claim: Claim, executor: Executor) -> None:
        try:
            prepared = await executor.prepare()
        except JobRejected as exc:
            error = exc.with_file(claim.source)
            self._rejected(error, self.queue.reject_claimed(claim, error))
            return
        outcome = await executor.run(prepared)
        succeeded = outcome.status is JobStatus.SUCCEEDED
        target = self.queue.finish(claim, succeeded, outcome.result)
        self.counts["succeeded" if succeeded else "failed"] += 1
        log.info(
            "job.finished",
            status=outcome.status.value,
            moved_to=str(target),
            error=outcome.result.get("error"),
        )

    def _finish_crashed(self, claim: Claim, exc: Exception) -> None:
        now = datetime.now(UTC)
        result = result_document(
            job_id=claim.job_id,
            status=JobStatus.FAILED,
            started_at=now,
            ended_at=now,
            records=[],
            error=str(exc),
        )
        target = self.queue.finish(claim, False, result)
        self.counts["failed"] += 1
        log.info(
            "job.finished", status=JobStatus.FAILED.value, moved_to=str(target), error=str(exc)
        )

    # -- watchdog ----------------------------------------------------------------------------------

    def _spawn_watchdog(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return []
        return [tg.create_task(self._watchdog(interval), name="flowsubmit-watchdog")]

    async def _watchdog(self, interval_s: float) -> None:
        """Ping systemd only while the claim loop makes progress, so a wedged loop gets restarted."""
        stale_after_s = self.settings.rescan_interval_s * 3 + interval_s
        while not self._stop.is_set():
            if time.monotonic() - self._heartbeat < stale_after_s:
                self.notifier.watchdog()
            await self._sleep(interval_s)


async def _answers(gateway: Gateway, timeout_s: float) -> bool:
    """One health check, bounded (Prefect's client retries a refused connection for a minute)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await gateway.healthy()
    except (TimeoutError, GatewayError):
        return False
