"""Fan-in: one event subscription for every tracked run, with batched polling as reconciliation and fallback.

Modes: ``streaming`` (the websocket is open; a slow reconciliation read catches
anything it lost) and ``polling`` (the stream is down; one batched read of all
unfinished runs every ``poll_interval_s``, while resubscribing with backoff).
Recording a final state is idempotent, so event and poll may race harmlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Self

import structlog

from flowsubmit._types import GatewayProtocol, RunSnapshot
from flowsubmit.errors import ClosedError, GatewayError

__all__ = ["Tracker", "TrackerMode"]

log = structlog.get_logger("flowsubmit.tracker")


class TrackerMode(StrEnum):
    """How the tracker currently learns about state changes."""

    STARTING = "starting"
    STREAMING = "streaming"
    POLLING = "polling"


@dataclass
class _Watch:
    future: asyncio.Future[RunSnapshot]
    start_time: datetime | None = None
    name: str | None = None
    seen_states: set[str] = field(default_factory=set)


class Tracker:
    """Owns the tracked-run registry, the subscription task and the poll task.

    ``watch(run_id)`` returns a future resolved with the run's final snapshot.
    Lifecycle: ``async with Tracker(gateway)``; ``aclose()`` cancels the tracker's
    own tasks (before the gateway they use is closed) and fails pending watches.
    """

    def __init__(
        self,
        gateway: GatewayProtocol,
        *,
        tag: str = "flowsubmit",
        poll_interval_s: float = 5.0,
        reconcile_interval_s: float = 60.0,
        resubscribe_max_backoff_s: float = 30.0,
        use_events: bool = True,
    ) -> None:
        self._gateway = gateway
        self._tag = tag
        self.poll_interval_s = poll_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.resubscribe_max_backoff_s = resubscribe_max_backoff_s
        self._use_events = use_events
        self._watches: dict[str, _Watch] = {}
        self._mode = TrackerMode.STARTING
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._closed = False
        #: Final states recorded, by where they came from ("event" or "poll").
        self.recorded: dict[str, int] = {"event": 0, "poll": 0}

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClosedError("a Tracker cannot be reopened once closed; create a new one")
        if self._use_events:
            self._spawn(self._stream_loop(), "flowsubmit-tracker-stream")
        else:
            self._set_mode(TrackerMode.POLLING, reason="events disabled")
        self._spawn(self._poll_loop(), "flowsubmit-tracker-poll")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel the tracker's tasks and fail the watches still pending; idempotent."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for watch in self._watches.values():
            if not watch.future.done():
                watch.future.cancel()
        self._watches.clear()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_task_failure)
        self._tasks.append(task)

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the stream is open (or polling has taken over); False on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._connected.wait()
        return self._connected.is_set()

    # -- public -----------------------------------------------------------------------------

    @property
    def mode(self) -> TrackerMode:
        """``streaming`` or ``polling`` (``starting`` before the first attempt ends)."""
        return self._mode

    @property
    def pending(self) -> int:
        """Runs tracked and not final yet."""
        return len(self._watches)

    def watch(self, flow_run_id: str) -> asyncio.Future[RunSnapshot]:
        """Track a run; the same future is returned for the same id until it resolves."""
        if self._closed:
            raise ClosedError("the Tracker is closed")
        watch = self._watches.get(flow_run_id)
        if watch is None:
            watch = self._watches[flow_run_id] = _Watch(asyncio.get_running_loop().create_future())
        return watch.future

    async def wait(self, flow_run_id: str) -> RunSnapshot:
        """Wait for the run's final snapshot."""
        return await asyncio.shield(self.watch(flow_run_id))

    def reconcile_soon(self) -> None:
        """Ask for a batched read of every unfinished run now."""
        self._wake.set()

    # -- recording ----------------------------------------------------------------------

    def observe(self, snap: RunSnapshot) -> None:
        """Record one observation; final ones resolve the run's future (idempotent)."""
        watch = self._watches.get(snap.flow_run_id)
        if watch is None:
            return
        if snap.state_id is not None:
            if snap.state_id in watch.seen_states:
                return
            watch.seen_states.add(snap.state_id)
        watch.start_time = watch.start_time or snap.start_time
        watch.name = snap.flow_run_name or watch.name
        if not snap.final:
            return
        del self._watches[snap.flow_run_id]
        self.recorded[snap.source] = self.recorded.get(snap.source, 0) + 1
        if not watch.future.done():
            watch.future.set_result(_merged(snap, watch))

    # -- loops --------------------------------------------------------------------------------

    async def _stream_loop(self) -> None:
        backoff = 1.0
        while True:
            try:
                async with self._gateway.run_events(self._tag) as events:
                    self._set_mode(TrackerMode.STREAMING)
                    backoff = 1.0
                    self.reconcile_soon()  # catch what ended while no stream was open
                    async for snap in events:
                        self.observe(snap)
            except GatewayError as exc:
                self._set_mode(TrackerMode.POLLING, reason=str(exc))
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, self.resubscribe_max_backoff_s)
            await asyncio.sleep(delay)

    async def _poll_loop(self) -> None:
        while True:
            interval = (
                self.poll_interval_s
                if self._mode is not TrackerMode.STREAMING
                else self.reconcile_interval_s
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(0.9, 1.1)):
                    await self._wake.wait()
            self._wake.clear()
            await self._poll_once()

    async def _poll_once(self) -> None:
        ids = list(self._watches)
        if not ids:
            return
        try:
            snaps = await self._gateway.read_runs(ids)
        except GatewayError as exc:
            log.warning("tracker.poll_failed", error=str(exc), pending=len(ids))
            return
        for snap in snaps:
            self.observe(snap)

    def _set_mode(self, mode: TrackerMode, reason: str | None = None) -> None:
        previous, self._mode = self._mode, mode
        self._connected.set()
        if mode is previous:
            return
        if mode is TrackerMode.POLLING:
            log.warning(
                "tracker.fallback",
                mode=mode.value,
                reason=reason,
                pending=self.pending,
                poll_interval_s=self.poll_interval_s,
            )
        elif previous is TrackerMode.POLLING:
            log.info("tracker.resumed", mode=mode.value, pending=self.pending)
        else:
            log.info("tracker.streaming", mode=mode.value)


def _merged(snap: RunSnapshot, watch: _Watch) -> RunSnapshot:
    if (snap.start_time or not watch.start_time) and (snap.flow_run_name or not watch.name):
        return snap
    return RunSnapshot(
        flow_run_id=snap.flow_run_id,
        state_type=snap.state_type,
        state_name=snap.state_name,
        flow_run_name=snap.flow_run_name or watch.name,
        state_id=snap.state_id,
        start_time=snap.start_time or watch.start_time,
        end_time=snap.end_time,
        source=snap.source,
    )


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tracker.task_failed", task=task.get_name(), exc_info=task.exception())
