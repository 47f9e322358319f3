"""The daemon's composition root: one class wires the rooms together and owns the loop, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from contextlib import AsyncExitStack

from flowsubmit import metrics
from flowsubmit.engine.tracker import Tracker
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.connection import display_url, versions
from flowsubmit.logs import get_logger
from flowsubmit.ops import http, retention
from flowsubmit.ops.heartbeat import Heartbeat
from flowsubmit.ops.sdnotify import Notifier
from flowsubmit.queue.crashpoints import CrashPoints
from flowsubmit.queue.folders import FOLDERS, Queue, job_files
from flowsubmit.queue.watcher import wakeups
from flowsubmit.service.intake import SWITCH_INTERVAL_S, Intake
from flowsubmit.service.jobs import RunningJobs
from flowsubmit.service.prefect_health import PrefectHealth
from flowsubmit.settings import Settings, crash_point

__all__ = ["Service"]

log = get_logger("flowsubmit.service")


class Service:
    """Owns the claim loop, signals, readiness and shutdown; the running jobs are ``RunningJobs``'s.

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
        self.policy = settings.policy()
        self.jobs = RunningJobs(
            self.queue,
            settings,
            self.policy,
            accepting=self._accepting,
            changed=lambda: self.notifier.status(self._status_line()),
        )
        self._intake = Intake(self.queue, settings, self.policy, self.jobs)
        self._gateway: Gateway | None = None
        self._tracker: Tracker | None = None
        self._health: PrefectHealth | None = None
        self.heartbeat = Heartbeat(self.queue.root, version=versions()[0])

    def __repr__(self) -> str:
        mode = self._tracker.mode.value if self._tracker else "not started"
        counts = " ".join(f"{k}={v}" for k, v in self.jobs.counts.items())
        return f"<Service queue={self.queue.root} running={len(self.jobs)} tracker={mode} {counts}>"

    def stop(self) -> None:
        """Stop claiming and shut down (what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until ``stop()``; jobs still running stay in ``processing/`` for the next start."""
        os.umask(0o027)
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # the loop waits less for judging threads
        self.queue.ensure()
        self.queue.check_locks()
        if self.queue.others_can_write():
            log.warning("service.queue_writable_by_others", queue=str(self.queue.root))
        if self.policy.launches_anything:
            log.warning(
                "service.any_deployment_allowed",
                allowed_deployments=list(self.policy.allowed_deployments),
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
            await self._health.know_server()
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
                self.jobs.open(self._gateway, self._tracker, tg)
                helpers = [
                    tg.create_task(
                        self._health.watch(lambda: len(self.jobs), self.jobs.abort_all),
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
        log.info("service.stopped", **self.jobs.counts)

    async def _claim_loop(self) -> None:
        ready = False
        async for _ in wakeups(
            self.queue.incoming,
            stop=self._stop,
            rescan_interval_s=self.settings.rescan_interval_s,
            force_polling=self.settings.force_polling,
        ):
            await self._intake.adopt_orphans()
            self.jobs.deliver_cancel_requests()
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
        server = self._gateway.server
        log.info(
            "service.ready",
            queue=str(self.queue.root),
            tracker=self._tracker.mode.value if self._tracker else None,
            prefect_api_url=display_url(self._gateway.api_url or ""),
            prefect_server_version=server.version if server else "unknown",
            version=versions()[0],
            prefect_version=versions()[1],
        )

    async def _drain(self) -> None:
        """Cancel running jobs and wait for them, bounded by ``drain_timeout_s``."""
        self.notifier.stopping()
        log.info("service.stopping", running=len(self.jobs), **self.jobs.counts)
        await self.jobs.drain()

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
            incoming=self.queue.incoming,
        )

    def _spawn_retention(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        days = self.settings.retention_days
        if days is None:
            return []
        task = retention.prune_periodically(self.queue.root, days, self._stop)
        return [tg.create_task(task, name="flowsubmit-retention")]

    def _status_line(self) -> str:
        pending = self._tracker.pending if self._tracker else 0
        counts = self.jobs.counts
        return f"{len(self.jobs)} jobs running, {pending} runs tracked, {counts['succeeded']} succeeded, {counts['failed']} failed"

    def _accepting(self) -> bool:
        """Jobs may be claimed: not stopping, and Prefect not known to be down (it could not
        take their runs)."""
        return not self._stop.is_set() and (self._health is None or self._health.down_since is None)

    # -- watchdog ----------------------------------------------------------------------------------

    def _spawn_watchdog(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return []
        stale_after_s = self.settings.rescan_interval_s * 3 + interval
        alive = self.notifier.keep_alive(self.heartbeat.beaten_at, stale_after_s, self._stop)
        return [tg.create_task(alive, name="flowsubmit-watchdog")]
