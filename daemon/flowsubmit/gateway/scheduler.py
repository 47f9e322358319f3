"""Fair, prioritised submission: in which order the pending run creates of many jobs go out in batches.

Issue 13. A job's runs are one *lane* (``RunRequest.lane``, its job id) with one
``priority``. Each *turn* sends one batch, of one deployment, from one lane (lanes that have not
had a turn yet fill the room it leaves):

- **Strict priority between levels.** The turn goes to the highest priority that has
  runs waiting, with one exception that bounds starvation: after ``RELIEF_EVERY - 1``
  turns in a row taken while lower-priority runs waited, the next turn goes to the
  lower-priority lane that has waited longest.
- **Fair by runs within a level** (self-clocked fair queueing, a deficit round-robin
  whose quantum is the batch). Each level keeps a virtual clock counted in runs: a
  lane starts at the clock when it starts waiting, advances by the runs it is given,
  and the clock follows the lane served last. The turn goes to the lane whose next
  batch would end first (the older lane on a tie). Two busy jobs therefore alternate
  full batches, and a job that has just arrived goes next: a waiting lane is at most
  one batch behind the clock. While a lane waits, no other lane of its level is
  given more than two batches.

A batch is formed only when the sender has a free slot, so a job that arrives while
another submits thousands of runs waits for one call to return, not for the others'
runs to be created.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flowsubmit._types import Deployment, RunRequest
from flowsubmit.errors import ClosedError
from flowsubmit.logs import get_logger

__all__ = ["RELIEF_EVERY", "CreateScheduler", "TurnOrder"]

log = get_logger("flowsubmit.scheduler")

#: One turn in this many at most goes to lower priority while higher-priority runs wait.
RELIEF_EVERY = 10

T = TypeVar("T")

#: Sends one batch of creates of one deployment; one result (run id or error) per request.
Send = Callable[[Deployment, list[RunRequest]], Awaitable[list[str | Exception]]]

#: How long a batch's results wait for the next batch's request to be on the wire.
HANDOVER_WAIT_S = 0.5


@dataclass(eq=False, slots=True)
class _Lane(Generic[T]):
    """One job's pending items, by group (deployment id), each group oldest first; it exists while it has items."""

    key: str
    priority: int
    seq: int
    #: Where its last batch ended on its level's virtual clock (runs given so far).
    finish: float = 0.0
    #: The turn number at which it last had a turn or started waiting.
    since: int = 0
    #: True once it has had a turn since it started waiting.
    served: bool = False
    groups: dict[str, deque[T]] = field(default_factory=dict)

    def next_size(self, limit: int) -> int:
        return min(limit, len(next(iter(self.groups.values()))))


class TurnOrder(Generic[T]):
    """Owns the items waiting in every lane and decides whose turn is next; pure (no I/O, no loop)."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane[T]] = {}
        self._clock: dict[int, float] = {}
        self._turns = 0
        self._seq = 0
        #: Turns in a row taken while a lower priority had items waiting.
        self._passed_over = 0
        self._pending = 0

    def __len__(self) -> int:
        return self._pending

    def add(self, lane: str, priority: int, group: str, item: T) -> None:
        """Queue ``item`` (of ``group``) in ``lane``, which has ``priority`` (higher first)."""
        found = self._lanes.get(lane)
        if found is None:  # starts waiting now, at its level's clock: no credit for idle time
            self._seq += 1
            found = self._lanes[lane] = _Lane(lane, priority, self._seq)
            found.finish, found.since = self._clock.get(priority, 0.0), self._turns
        found.groups.setdefault(group, deque()).append(item)
        self._pending += 1

    def next_batch(self, limit: int) -> tuple[str, list[T]] | None:
        """Take the next turn: (group, up to ``limit`` items), or ``None`` when nothing waits.

        The turn is one lane's; when its runs leave room, lanes that have not had a
        turn yet and wait with the same group share it, in turn order: a burst of
        small jobs goes out in one call, and a small job's first call is never
        padded with a big job's runs.
        """
        if not self._lanes:
            return None
        lane = self._choose(list(self._lanes.values()), limit)
        group = next(iter(lane.groups))
        self._turns += 1
        items = self._take(lane, group, limit)
        while len(items) < limit:
            newcomers = [
                other
                for other in self._lanes.values()
                if not other.served and next(iter(other.groups)) == group
            ]
            if not newcomers:
                break
            room = limit - len(items)
            other = min(newcomers, key=lambda o: (-o.priority, o.finish + o.next_size(room), o.seq))
            items += self._take(other, group, room)
        return group, items

    def _take(self, lane: _Lane[T], group: str, limit: int) -> list[T]:
        """Give ``lane`` up to ``limit`` items of ``group``, and advance its place on the clock."""
        queue = lane.groups[group]
        items = [queue.popleft() for _ in range(min(limit, len(queue)))]
        if not queue:
            del lane.groups[group]  # the lane's next batch is of its next group
        lane.finish += len(items)
        self._clock[lane.priority] = max(self._clock.get(lane.priority, 0.0), lane.finish)
        lane.since, lane.served = self._turns, True
        self._pending -= len(items)
        if not lane.groups:
            del self._lanes[lane.key]  # back later, it starts at the clock: idle time earns nothing
        return items

    def _choose(self, waiting: list[_Lane[T]], limit: int) -> _Lane[T]:
        top = max(lane.priority for lane in waiting)
        lower = [lane for lane in waiting if lane.priority < top]
        if lower and self._passed_over >= RELIEF_EVERY - 1:
            self._passed_over = 0
            return min(lower, key=lambda lane: (lane.since, lane.seq))
        self._passed_over = self._passed_over + 1 if lower else 0
        return min(
            (lane for lane in waiting if lane.priority == top),
            key=lambda lane: (lane.finish + lane.next_size(limit), lane.seq),
        )


@dataclass(eq=False, slots=True)
class _Pending:
    request: RunRequest
    future: asyncio.Future[str]


class CreateScheduler:
    """Owns the creates waiting to be sent and the batches out: one batch per free slot, in turn order.

    The sender (``send``) owns the call itself (bulk or single route, retries, its own
    in-flight limit); ``capacity`` says how many batches may be out at once and
    ``batch_size`` how large one may be, both read at every turn so that either may
    change while running. A batch is out until the sender returns, its retries
    included: one backing off after a call that created nothing holds its turn (the
    next call would most likely fail the same way).
    """

    def __init__(
        self,
        send: Send,
        *,
        capacity: Callable[[], int],
        batch_size: Callable[[], int],
        sent: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._send = send
        #: Returns once the next create request has been written to the server, if given.
        self._request_written = sent
        self._capacity = capacity
        self._batch_size = batch_size
        self._order: TurnOrder[_Pending] = TurnOrder()
        self._deployments: dict[str, Deployment] = {}
        self._out: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Handle | None = None
        self._closed = False

    async def create(self, deployment: Deployment, request: RunRequest) -> str:
        """Queue one create in its lane and wait for its run id."""
        if self._closed:
            raise ClosedError("the create scheduler is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._deployments[deployment.id] = deployment
        self._order.add(request.lane, request.priority, deployment.id, _Pending(request, future))
        if self._wakeup is None:
            # Dispatch on the next tick, so the creates issued in this one join one batch.
            self._wakeup = loop.call_soon(self._dispatch)
        return await future

    def close(self) -> None:
        """Cancel the batches out and fail every create still waiting; idempotent."""
        self._closed = True
        for task in list(self._out):
            task.cancel()
        while (turn := self._order.next_batch(len(self._order) or 1)) is not None:
            for pending in turn[1]:
                _fail(pending, ClosedError("the gateway was closed before this run was created"))

    def _dispatch(self) -> None:
        """Hand the sender a batch for every free slot, in turn order."""
        self._wakeup = None
        while not self._closed and len(self._out) < self._capacity():
            turn = self._order.next_batch(self._batch_size())
            if turn is None:
                return
            deployment_id, batch = turn
            batch = [p for p in batch if not p.future.done()]  # its caller stopped waiting
            if not batch:
                continue
            deployment = self._deployments[deployment_id]
            task = asyncio.create_task(
                self._send_batch(deployment, batch), name=f"flowsubmit-create-{deployment.name}"
            )
            self._out.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._release(task)  # already done unless the task died before its `finally`
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway.task_failed", task=task.get_name(), exc_info=task.exception())

    def _release(self, task: asyncio.Task[None] | None) -> bool:
        """Free a batch's slot and hand the sender the next batch at once; True if one went out."""
        if task not in self._out:
            return False
        self._out.discard(task)
        before = len(self._out)
        self._dispatch()
        return len(self._out) > before

    async def _send_batch(self, deployment: Deployment, batch: list[_Pending]) -> None:
        results: list[str | Exception]
        followed = False
        try:
            results = await self._send(deployment, [p.request for p in batch])
        except asyncio.CancelledError:
            for pending in batch:
                _fail(pending, ClosedError("the gateway was closed while this run was created"))
            raise
        except Exception as exc:
            results = [exc] * len(batch)
        finally:
            followed = self._release(asyncio.current_task())
        if followed and self._request_written is not None:
            # The next batch's request reaches the server before these results are handed
            # over: their callers (journal, log line, tracker) would otherwise run first
            # and hold it back for a few hundred milliseconds, and a SQLite-backed server
            # gives its write lock to its own event writers meanwhile; the call that
            # comes late then has every item refused ("database is locked").
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HANDOVER_WAIT_S):
                    await self._request_written()
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                _fail(pending, result)
            elif not pending.future.done():
                pending.future.set_result(result)


def _fail(pending: _Pending, exc: BaseException) -> None:
    if not pending.future.done():
        pending.future.set_exception(exc)
