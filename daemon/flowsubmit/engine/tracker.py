"""Fan-in: one event subscription for every tracked run, with batched polling as reconciliation and fallback.

Modes: ``streaming`` (the websocket is open; a count of the runs that ended since
the last check finds what it lost, see ``Tracker._behind_loop``) and ``polling``
(the stream is down; one batched read of all unfinished runs every
``poll_interval_s``, while resubscribing with backoff). Recording a final state is
idempotent, so event and poll may race harmlessly.

While streaming, the idle cost does not grow with the pending runs: each
``reconcile_interval_s`` the tracker counts the runs that ended (one request) and
reads one slice of a slow rolling pass over the pending runs, sized so that every
pending run is read once per ``NET_CYCLE`` intervals (one page of 200 up to 6,000
pending). The rolling pass is the net for a final whose event was lost *and* whose
end time fell outside every counted window (a state committed seconds after its
timestamp, a clock far off). A whole pass comes only when something may have ended
while nobody listened: the stream reopened, runs re-attached after a restart.

A batched read asks only for the runs among its ids that are final, 200 ids per
call, each call under its own time limit; a pass that fails part-way goes on from
there at the next turn. So at 10,000 pending runs a pass costs 50 small answers
and always progresses, however slow the server is to answer one page.

A final event is recorded as it arrives, without a confirming read. The
server emits a state-change event from inside the transaction that commits the
state, with the state's own id, type, name and timestamp: a read can only lag
behind it by milliseconds (measured in ``bench/tracking.py``), and one read per
final event would cost more requests than the whole stream-up budget (under 0.05
per run). The steady reconciliation stays as the safety net for lost events.

Streaming costs no reads for new runs: a run created while the stream was live
(``watch(created_since=...)``), or whose live event arrived on the open stream, is
*covered*. A run watched without either (created before the stream opened,
re-attached after a restart, found again by its idempotency key) is read once,
batched with the others, ``new_run_grace_s`` after it is watched. The stream does
not ask for the events that tell nothing (``UNSUBSCRIBED_EVENTS`` in the gateway).

Before its final, a run's state is one small code (``SCHEDULED``, ``LATE``,
``RUNNING``), learnt from its events and from that one read of an uncovered run
(which asks for every state, not the finals only): what ``flowsubmit status``
counts, and what tells a job that nobody executes its runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Self

from flowsubmit import metrics
from flowsubmit._aio import wait_event
from flowsubmit._types import GatewayProtocol, RunSnapshot
from flowsubmit.errors import ClosedError, GatewayError, TransientGatewayError
from flowsubmit.gateway.client import READ_BATCH
from flowsubmit.logs import get_logger

__all__ = [
    "LATE",
    "RUNNING",
    "SCHEDULED",
    "STATE_NAMES",
    "Listener",
    "Tracker",
    "TrackerMode",
    "state_code",
]

log = get_logger("flowsubmit.tracker")

#: Events of runs nobody watches yet (created a moment ago, or another job's) kept
#: per stream session, so that a final event arriving before ``watch()`` is not lost.
UNCLAIMED_MAX = 10_000
#: The server starts streaming to a subscriber when it reads the filter message,
#: shortly after the subscriber sends it: only events that occurred after this margin
#: are certainly live, and so prove that every later event of their run will arrive.
_LIVE_MARGIN = timedelta(seconds=0.25)
#: Prefect's server drops the events of a subscriber that has 256 waiting
#: (``SUBSCRIPTION_BACKLOG`` in ``prefect/server/events/stream.py``). After half as
#: many events within ``BURST_WINDOW_S``, some may have been lost in a burst: the
#: stream is checked every ``BEHIND_CHECK_S`` for ``QUIET_AFTER_S`` (a count, one
#: request, never a read of every pending run).
BURST_EVENTS = 128
BURST_WINDOW_S = 1.0
#: While streaming, every pending run is read at least once per this many
#: ``reconcile_interval_s`` by the rolling pass (the net behind the stream checks).
NET_CYCLE = 30
#: While streaming with runs pending, the tracker counts the runs of its tag that ended
#: in the window since its last check (reaching ``_REWIND`` back) and compares the count
#: with the finals it saw for that window; if the server knows more, the stream fell
#: behind or lost events, and the window's finals are read at once. The window closes
#: ``EVENT_LAG_S`` before now: the events of runs that ended later may still be on their
#: way. When and how often: ``Tracker._behind_loop``.
BEHIND_CHECK_S = 2.0
QUIET_AFTER_S = 30.0
_REWIND = timedelta(seconds=6.0)
EVENT_LAG_S = 1.5
_EVENT_LAG = timedelta(seconds=EVENT_LAG_S)


#: Where a run not final yet stands, as one small int per run (an int, not the snapshot:
#: at 100,000 runs the tracker keeps a slot per run, never an object): not started yet
#: (Scheduled, Pending, AwaitingRetry; what a run is until an event says more), Late
#: (Scheduled past its start time: nobody picked it up), and started (Running, Paused,
#: Cancelling).
SCHEDULED, LATE, RUNNING = 0, 1, 2
#: The codes' names, as ``flowsubmit status`` counts them.
STATE_NAMES = ("scheduled", "late", "running")
#: What to do about a Late run (the daemon's ``job.runs_late``, the library's
#: ``submission.runs_late``).
LATE_HINT = "no worker or runner polls it: start one, or check the work pool"
_STARTED_TYPES = frozenset({"RUNNING", "PAUSED", "CANCELLING"})


def state_code(snap: RunSnapshot) -> int:
    """The code of a non-final snapshot: a Late run is type SCHEDULED named ``Late``."""
    if snap.state_type in _STARTED_TYPES:
        return RUNNING
    return LATE if snap.state_name == "Late" else SCHEDULED


#: What ``Tracker.follow`` calls: ``(run id, final snapshot)`` once, ``(run id, None)`` on a state change.
Listener = Callable[[str, RunSnapshot | None], None]


class TrackerMode(StrEnum):
    """How the tracker currently learns about state changes."""

    STARTING = "starting"
    STREAMING = "streaming"
    POLLING = "polling"


@dataclass(slots=True)
class _Run:
    """What is known of one run while it waits: who waits for it once watched, its final state once seen.

    A few fields and no container, for every pending run: a state seen twice (by an
    event and a read) needs no memory of state ids, because a run leaves the
    registry with its first final state, and only a final state resolves it.
    """

    #: Resolved with the final snapshot (``watch``); None for a run only followed.
    future: asyncio.Future[RunSnapshot] | None = None
    #: Called soon with the run's id and its final snapshot, or None when its state code
    #: changed (``follow``): one shared callable, where a future each costs every pending run.
    listener: Listener | None = None
    final: RunSnapshot | None = None
    start_time: datetime | None = None
    name: str | None = None
    #: A live event of this run arrived on the current stream session.
    covered: bool = False
    #: Where the run stands while not final: ``SCHEDULED``, ``LATE`` or ``RUNNING``.
    code: int = SCHEDULED


class Tracker:
    """Owns the tracked-run registry, the subscription task, the poll task and the check task.

    ``watch(run_id)`` returns a future resolved with the run's final snapshot;
    ``follow(run_id, listener)`` calls a listener instead (no future per run: how a
    run-set tracks its runs). Lifecycle: ``async with Tracker(gateway)``; ``aclose()`` cancels the tracker's
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
        new_run_grace_s: float = 1.0,
        use_events: bool = True,
    ) -> None:
        self._gateway = gateway
        self._tag = tag
        self.poll_interval_s = poll_interval_s
        self.reconcile_interval_s = reconcile_interval_s
        self.resubscribe_max_backoff_s = resubscribe_max_backoff_s
        self.new_run_grace_s = new_run_grace_s
        self._use_events = use_events
        self._watches: dict[str, _Run] = {}
        #: Per listener, how many of its watched runs stand at each code (``STATE_NAMES``),
        #: kept as codes change: ``counts`` answers without a pass over 100,000 runs.
        self._counts: dict[Listener, list[int]] = {}
        self._unclaimed: OrderedDict[str, _Run] = OrderedDict()
        self._unseen: set[str] = set()
        #: What is left of the current pass of the poll loop (kept when a page fails), and
        #: whether it is a whole pass (read at once) or the rolling one (a slice a turn).
        self._pass: list[str] = []
        self._pass_whole = False
        #: Events in the current burst window, and when it began (loop time).
        self._window_events = 0
        self._window_start = 0.0
        #: When (loop time) the last event, and the last final event, arrived.
        self._last_event = self._last_final_event = 0.0
        #: When (loop time) the last burst of events began.
        self._last_burst = float("-inf")
        self._live_since: datetime | None = None
        #: Where the next stream check's window starts (server end times), and the final
        #: events seen since: run id -> end time, pruned as the window moves on.
        self._checked_until: datetime | None = None
        self._window_floor: datetime | None = None
        self._seen_ended: dict[str, datetime] = {}
        #: The last stream check found runs the stream had not delivered.
        self._missed = False
        self._mode = TrackerMode.STARTING
        self._wake = asyncio.Event()
        self._check = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()
        self._closed = False
        #: Final states recorded, by where they came from ("event" or "poll").
        self.recorded: dict[str, int] = {"event": 0, "poll": 0}
        #: Since when (loop time) every read has failed, and the last read's error;
        #: ``None`` once a read succeeds. The library's ``wait()`` gives up on it.
        self.failing_since: float | None = None
        self.last_error: GatewayError | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClosedError("a Tracker cannot be reopened once closed; create a new one")
        if self._use_events:
            self._spawn(self._stream_loop(), "flowsubmit-tracker-stream")
            self._spawn(self._check_loop(), "flowsubmit-tracker-check")
            self._spawn(self._behind_loop(), "flowsubmit-tracker-behind")
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
        for run in self._watches.values():
            if run.future is not None and not run.future.done():
                run.future.cancel()
        self._watches.clear()
        self._counts.clear()
        self._unclaimed.clear()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_task_failure)
        self._tasks.append(task)

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until the stream is live (or polling has taken over); False on timeout.

        Live: past the margin after opening, so that runs created from now on are
        covered from their creation (``watch(created_since=...)``) and need no read.
        """
        if not await wait_event(self._connected, timeout_s):
            return False
        if (since := self._live_since) is not None:
            await asyncio.sleep(max(0.0, (since - datetime.now(UTC)).total_seconds()))
        return True

    # -- public -----------------------------------------------------------------------------

    @property
    def mode(self) -> TrackerMode:
        """``streaming`` or ``polling`` (``starting`` before the first attempt ends)."""
        return self._mode

    @property
    def pending(self) -> int:
        """Runs tracked and not final yet."""
        return len(self._watches)

    def watch(
        self, flow_run_id: str, *, created_since: datetime | None = None
    ) -> asyncio.Future[RunSnapshot]:
        """Track a run; the same future, resolved with its final snapshot, is returned for the same id.

        ``created_since``: the run was created by a request sent at that time or later
        (not found again by its key). If the stream was live by then, every event of the
        run comes after it is subscribed to: the run is covered, and needs no read.
        """
        run = self._watches.get(flow_run_id)
        if run is not None and run.future is not None:
            return run.future
        future: asyncio.Future[RunSnapshot] = asyncio.get_running_loop().create_future()
        self._claim(flow_run_id, created_since, future=future)
        return future

    def follow(
        self, flow_run_id: str, listener: Listener, *, created_since: datetime | None = None
    ) -> None:
        """Track a run for ``listener``: no future, so a pending run costs its record alone.

        ``listener`` is called soon (from the event loop, never inside this call) with
        the run's id and its final snapshot once, and with ``None`` whenever the run's
        ``state`` changes before that. A run followed again keeps one record and the
        latest listener. Not called when the tracker closes or ``forget`` is called.
        """
        self._claim(flow_run_id, created_since, listener=listener)

    def _claim(
        self,
        flow_run_id: str,
        created_since: datetime | None,
        *,
        future: asyncio.Future[RunSnapshot] | None = None,
        listener: Listener | None = None,
    ) -> None:
        """Register a run not watched yet; a run watched already only takes the waiter given."""
        if self._closed:
            raise ClosedError("the Tracker is closed")
        watched = self._watches.get(flow_run_id)
        run = watched or self._unclaimed.pop(flow_run_id, None) or _Run()
        if watched is not None:
            self._count(run, -1)
        run.future = future or run.future
        run.listener = listener or run.listener
        self._count(run, 1)
        if watched is not None:
            return
        self._watches[flow_run_id] = run
        if run.final is not None:
            self._resolve(flow_run_id, run, run.final)
            return
        if run.code != SCHEDULED and listener is not None:  # an event came before the watch
            asyncio.get_running_loop().call_soon(listener, flow_run_id, None)
        live_since = self._live_since
        if created_since is not None and live_since is not None and created_since >= live_since:
            run.covered = True
        if not run.covered and self._mode is TrackerMode.STREAMING:
            self._unseen.add(flow_run_id)
            self._check.set()

    def forget(self, flow_run_id: str) -> None:
        """Stop tracking a run (its job gave up on it); a pending ``watch`` future is cancelled."""
        run = self._watches.pop(flow_run_id, None)
        self._unseen.discard(flow_run_id)
        if run is not None:
            self._count(run, -1)
        if run is not None and run.future is not None and not run.future.done():
            run.future.cancel()

    def state(self, flow_run_id: str) -> int:
        """Where a watched run not final yet stands (``SCHEDULED`` when unknown or unwatched)."""
        run = self._watches.get(flow_run_id)
        return run.code if run is not None else SCHEDULED

    def counts(self, listener: Listener) -> tuple[int, int, int]:
        """How many runs followed by ``listener`` and not final yet stand at each code (``STATE_NAMES``)."""
        scheduled, late, running = self._counts.get(listener, (0, 0, 0))
        return scheduled, late, running

    def _count(self, run: _Run, step: int) -> None:
        """Add a watched run to (1) or take it from (-1) its listener's count at its code."""
        if run.listener is None:
            return
        counts = self._counts.get(run.listener)
        if counts is None:
            counts = self._counts[run.listener] = [0, 0, 0]
        counts[run.code] += step
        if step < 0 and not any(counts):
            del self._counts[run.listener]  # a run-set that ended is not kept alive here

    def reconcile_soon(self) -> None:
        """Ask for a batched read of every unfinished run now."""
        self._wake.set()

    # -- recording ----------------------------------------------------------------------

    def observe(self, snap: RunSnapshot) -> RunSnapshot | None:
        """Record one observation (idempotent); returns the final snapshot when it resolved a watched run.

        The final given to waiters is completed with the start time and name earlier
        states carried (a final event may lack them).
        """
        if snap.final:
            self._note_final(snap)
        run = self._watches.get(snap.flow_run_id)
        if run is None:
            if snap.source == "event":
                self._keep_unclaimed(snap)
            return None
        self._note(run, snap)
        if snap.final:
            return self._resolve(snap.flow_run_id, run, snap)
        if run.code != (code := state_code(snap)):
            self._count(run, -1)
            run.code = code
            self._count(run, 1)
            if run.listener is not None:
                asyncio.get_running_loop().call_soon(run.listener, snap.flow_run_id, None)
        return None

    def _note_final(self, snap: RunSnapshot) -> None:
        """Remember a final seen (event or read) for the stream checks' counts."""
        if snap.source == "event":
            self._last_final_event = asyncio.get_running_loop().time()
        ended = snap.end_time or snap.occurred
        if self._window_floor is not None and ended is not None and ended >= self._window_floor:
            self._seen_ended[snap.flow_run_id] = ended

    def _note(self, run: _Run, snap: RunSnapshot) -> None:
        """Fold ``snap`` into ``run``: coverage, and the start time and name the final may lack."""
        if snap.source == "event" and self._is_live(snap):
            run.covered = True
        run.start_time = run.start_time or snap.start_time
        run.name = snap.flow_run_name or run.name

    def _keep_unclaimed(self, snap: RunSnapshot) -> None:
        run = self._unclaimed.get(snap.flow_run_id)
        if run is None:
            run = self._unclaimed[snap.flow_run_id] = _Run()
            if len(self._unclaimed) > UNCLAIMED_MAX:
                self._unclaimed.popitem(last=False)
        self._note(run, snap)
        if snap.final and run.final is None:
            run.final = snap
        elif not snap.final:
            run.code = state_code(snap)

    def _resolve(self, flow_run_id: str, run: _Run, snap: RunSnapshot) -> RunSnapshot:
        del self._watches[flow_run_id]
        self._count(run, -1)
        self._unseen.discard(flow_run_id)
        self.recorded[snap.source] = self.recorded.get(snap.source, 0) + 1
        final = _merged(snap, run)
        if run.future is not None and not run.future.done():
            run.future.set_result(final)
        if run.listener is not None:  # called as a done-callback is: soon, on its own
            asyncio.get_running_loop().call_soon(run.listener, flow_run_id, final)
        return final

    def _is_live(self, snap: RunSnapshot) -> bool:
        since = self._live_since
        return since is not None and snap.occurred is not None and snap.occurred >= since

    def _begin_session(self) -> None:
        """A stream (re)opened: coverage starts again, and everything unfinished is read once."""
        self._live_since = datetime.now(UTC) + _LIVE_MARGIN
        self._end_session()
        self._open_window(datetime.now(UTC))
        self._set_mode(TrackerMode.STREAMING)
        self.reconcile_soon()  # catch what ended while no stream was open

    def _end_session(self) -> None:
        """Events may have been lost from here on: no run stays covered (a final seen stays final)."""
        for run in (*self._watches.values(), *self._unclaimed.values()):
            run.covered = False

    # -- loops --------------------------------------------------------------------------------

    async def _stream_loop(self) -> None:
        backoff = 1.0
        while True:
            try:
                async with self._gateway.run_events(self._tag) as events:
                    self._begin_session()
                    backoff = 1.0
                    async for snap in events:
                        self._count_event()
                        self.observe(snap)
            except GatewayError as exc:
                self._live_since = None
                self._end_session()
                self._set_mode(TrackerMode.POLLING, reason=str(exc))
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, self.resubscribe_max_backoff_s)
            await asyncio.sleep(delay)

    async def _poll_loop(self) -> None:
        """Polling: a whole pass every ``poll_interval_s``. Streaming: a slice of the rolling pass every ``reconcile_interval_s``, a whole pass when asked."""
        while True:
            streaming = self._mode is TrackerMode.STREAMING
            interval = self.reconcile_interval_s if streaming else self.poll_interval_s
            asked = await wait_event(self._wake, interval * random.uniform(0.9, 1.1))
            self._wake.clear()
            if asked or self._mode is not TrackerMode.STREAMING:
                await self._poll_pass()
            else:
                await self._poll_pass(pages=-(-len(self._watches) // (READ_BATCH * NET_CYCLE)))

    def _count_event(self) -> None:
        """Note a burst of events that may have overflowed the server's backlog (see ``BURST_EVENTS``)."""
        now = self._last_event = asyncio.get_running_loop().time()
        if now - self._window_start > BURST_WINDOW_S:
            self._window_start, self._window_events = now, 0
        self._window_events += 1
        if self._window_events == BURST_EVENTS:
            self._last_burst = now

    async def _poll_pass(self, pages: int | None = None) -> None:
        """Read the unfinished runs page by page: all of them, or ``pages`` pages of the rolling pass.

        A failed page ends this turn, not the pass: the next turn goes on where this one
        stopped, so at 10,000 pending runs a pass completes even when a read fails now and
        then or the server answers slowly. A whole pass asked for while the rolling one is
        under way starts again from every pending run.
        """
        if not self._pass or (pages is None and not self._pass_whole):
            self._pass, self._pass_whole = list(self._watches), pages is None
        todo = [i for i in self._pass if i in self._watches]
        limit = len(todo) if pages is None else pages * READ_BATCH
        done = await self._read(todo[:limit])
        self._pass = todo[done:]

    async def _behind_loop(self) -> None:
        """Notice within seconds a stream that stalled or lost final events, and read what it missed.

        Checks every ``BEHIND_CHECK_S`` while there is reason to: final events, or a
        burst of any events (``BURST_EVENTS``), arrived within ``QUIET_AFTER_S`` (either may
        overflow the server's backlog), the stream fell silent after events flowed (a
        stall looks like that), or the last check found runs missing. Otherwise, while
        events trickle or nothing happens (runs that last hours), the period doubles up
        to ``reconcile_interval_s``: one count a minute, whatever the pending runs.
        """
        period, next_check = BEHIND_CHECK_S, 0.0
        while True:
            await asyncio.sleep(BEHIND_CHECK_S)
            if self._mode is not TrackerMode.STREAMING or not self._watches:
                self._open_window(datetime.now(UTC) - _EVENT_LAG)
                period, next_check = BEHIND_CHECK_S, 0.0
                continue
            now = asyncio.get_running_loop().time()
            if not self._urgent(now) and now < next_check:
                continue
            self._missed = await self._check_behind()
            period = (
                BEHIND_CHECK_S if self._urgent(now) else min(2 * period, self.reconcile_interval_s)
            )
            next_check = now + period

    def _urgent(self, now: float) -> bool:
        """Whether the stream must be checked at once (see ``_behind_loop``)."""
        silent_s = now - self._last_event
        return (
            self._missed
            or now - self._last_burst < QUIET_AFTER_S
            or now - self._last_final_event < QUIET_AFTER_S
            or BEHIND_CHECK_S <= silent_s < QUIET_AFTER_S
        )

    def _open_window(self, since: datetime) -> None:
        """Stream checks start at ``since``: nothing before it is counted."""
        self._window_floor = self._checked_until = since
        self._seen_ended = {}

    async def _check_behind(self) -> bool:
        """One check: the server's count of a window's finals against the finals seen; True if some were missed.

        The window reaches ``REWIND_S`` back from its end (not before the session
        began): a final whose commit came late, with an earlier ``end_time``, is
        still counted.
        """
        until = datetime.now(UTC) - _EVENT_LAG
        if self._checked_until is None or self._window_floor is None:
            return False
        since = max(self._window_floor, min(self._checked_until, until - _REWIND))
        if until <= since:
            return False
        missed = False
        try:
            ended = await self._gateway.count_finished(self._tag, since, until)
            if ended is None:
                return False  # not asked now (a rate limit): the same window next time
            seen = sum(1 for t in self._seen_ended.values() if since <= t < until)
            missed = ended > seen
            if missed:
                log.info("tracker.stream_behind", missed=ended - seen, pending=self.pending)
                for snap in await self._gateway.read_finished(self._tag, since, until):
                    self.observe(snap)
        except GatewayError as exc:
            log.warning("tracker.check_failed", error=str(exc))
            return False  # the same window again next time
        self._checked_until = until
        self._seen_ended = {i: t for i, t in self._seen_ended.items() if t >= until - _REWIND}
        return missed

    async def _check_loop(self) -> None:
        """Read, once and in one batch, the newly watched runs the stream has not covered.

        This one read asks for every state, not the final ones only: a run re-attached
        after a restart may have turned Late (or started) while nobody listened, and
        no event will say it again. The steady reconciliation reads finals only.
        """
        while True:
            await self._check.wait()
            await asyncio.sleep(self.new_run_grace_s)
            self._check.clear()
            unseen, self._unseen = self._unseen, set()
            if self._mode is not TrackerMode.STREAMING:
                continue  # polling reads every unfinished run anyway
            await self._read(
                [i for i in unseen if (run := self._watches.get(i)) and not run.covered],
                final_only=False,
            )

    async def _read(self, ids: list[str], *, final_only: bool = True) -> int:
        """Read the final states among ``ids`` (every state unless ``final_only``), one page at a time; return how many ids were read."""
        # The poll loop is the retry loop: one page may not sit out a whole outage inside
        # the gateway's (and Prefect's client's) retries, or polling resumes late after it.
        # The limit is per page: a whole pass of 50 pages may take longer, and still ends.
        limit_s = max(2 * self.poll_interval_s, 10.0)
        for start in range(0, len(ids), READ_BATCH):
            page = ids[start : start + READ_BATCH]
            try:
                async with asyncio.timeout(limit_s):
                    snaps = await self._gateway.read_runs(page, final_only=final_only)
            except (GatewayError, TimeoutError) as exc:
                error = str(exc) or f"no answer within {limit_s:g} s"
                log.warning("tracker.poll_failed", error=error, pending=len(ids) - start)
                self._failed(exc, error)
                return start
            self.failing_since = self.last_error = None
            for snap in snaps:
                self.observe(snap)
        return len(ids)

    def _failed(self, exc: Exception, error: str) -> None:
        if self.failing_since is None:
            self.failing_since = asyncio.get_running_loop().time()
        self.last_error = (
            exc
            if isinstance(exc, GatewayError)
            else TransientGatewayError(f"read flow runs: {error}", operation="read_flow_runs")
        )

    def _set_mode(self, mode: TrackerMode, reason: str | None = None) -> None:
        previous, self._mode = self._mode, mode
        self._connected.set()
        if mode is TrackerMode.STREAMING:  # the server answers again
            self.failing_since = self.last_error = None
        if mode is previous:
            return
        if mode is TrackerMode.POLLING:
            # Poll at once: the poll loop may be asleep for a whole reconcile interval.
            self.reconcile_soon()
            metrics.TRACKER_FALLBACKS.inc()
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


def _merged(snap: RunSnapshot, run: _Run) -> RunSnapshot:
    """The final snapshot, completed with the start time and name seen on earlier states."""
    if (snap.flow_run_name or not run.name) and (snap.start_time or not run.start_time):
        return snap  # nothing to add: no copy (one per run at the end of a large job)
    return dataclasses.replace(
        snap,
        flow_run_name=snap.flow_run_name or run.name,
        start_time=snap.start_time or run.start_time,
    )


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tracker.task_failed", task=task.get_name(), exc_info=task.exception())
