"""How fast create calls go out: spaced out after an HTTP 429 (``Pacer``), one at a time while the database contends (``CallLimit``), each about a second long (``CallSize``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from flowsubmit.logs import get_logger

__all__ = ["CallLimit", "CallSize", "Pacer"]

log = get_logger("flowsubmit.gateway")


class Pacer:
    """Owns the gap between the starts of two create calls and the pause a ``Retry-After`` asks for.

    Unthrottled the gap is 0 and ``pace()`` returns at once. A refusal (429) pauses
    every create call until its ``Retry-After`` has passed and doubles the gap
    (multiplicative decrease of the rate), starting at ``first_gap_s``; each
    accepted call shortens it by a fifth (``shrink``) until it falls under
    ``min_gap_s``, when the pacer is unthrottled again: at least seven accepted
    calls in a row after one refusal. Refusals that arrive together (calls sent in
    the same moment) double the gap once.
    """

    def __init__(
        self,
        *,
        first_gap_s: float = 1.0,
        min_gap_s: float = 0.25,
        max_gap_s: float = 60.0,
        shrink: float = 0.8,
    ) -> None:
        self.first_gap_s = first_gap_s
        self.min_gap_s = min_gap_s
        self.max_gap_s = max_gap_s
        self.shrink = shrink
        #: Seconds between the starts of two create calls; 0 while unthrottled.
        self.gap_s = 0.0
        self._next_at = 0.0
        self._last_refused_at = -float("inf")
        #: Refusals seen, and how often the pacer changed state (for tests and bench).
        self.refusals = 0

    @property
    def throttled(self) -> bool:
        """True while create calls are spaced out."""
        return self.gap_s > 0

    async def pace(self) -> None:
        """Wait until the next create call may start, and claim that start."""
        # A loop, not an Event: a 429 arriving meanwhile moves the moment further out.
        while (wait_s := self._next_at - time.monotonic()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(wait_s)
        self._next_at = time.monotonic() + self.gap_s

    def refused(self, retry_after_s: float | None, route: str) -> None:
        """The API answered 429: pause until ``Retry-After`` and halve the rate."""
        now = time.monotonic()
        self.refusals += 1
        was_throttled = self.throttled
        if now - self._last_refused_at >= self.gap_s:
            self.gap_s = min(self.max_gap_s, max(self.first_gap_s, 2 * self.gap_s))
        self._last_refused_at = now
        pause_s = retry_after_s if retry_after_s is not None else self.gap_s
        self._next_at = max(self._next_at, now + pause_s)
        if not was_throttled:
            log.warning(
                "gateway.throttled",
                route=route,
                retry_after_s=retry_after_s,
                gap_s=round(self.gap_s, 3),
            )

    def accepted(self) -> None:
        """A create call went through without a 429: speed up a little."""
        if not self.throttled:
            return
        self.gap_s *= self.shrink
        if self.gap_s < self.min_gap_s:
            self.gap_s = 0.0
            log.info("gateway.unthrottled", refusals=self.refusals)


class CallLimit:
    """Owns how many create calls may be on the wire at once.

    It starts at one call and opens to ``maximum`` (``max_inflight_submissions``), one
    more at a time, after ``open_after`` calls in a row without contention. A call in
    which the server refused items for database contention (a SQLite-backed server
    takes one writer at a time, and a second transaction that wants to write fails at
    once with "database is locked") brings it down to one, so that our own calls stop
    colliding: two calls in flight against such a server create fewer runs than one.
    After ``recover_after`` calls in a row without contention it goes up by one again,
    so a server whose contention was passing (PostgreSQL under a burst) gets its
    parallel calls back. Logged as ``gateway.call_limit``.

    Why start at one: against SQLite the first two calls collided, and the refused one
    held the first results back by about a second (measured: the first run of a job
    was created 2.0 s after its claim, 0.9 s of it for the collision).

    ``slot()`` is held while a call is on the wire: a batch whose call was refused
    for contention waits for the others' calls to return before it tries again,
    instead of colliding with them once more.
    """

    def __init__(self, maximum: int, *, recover_after: int = 50, open_after: int = 3) -> None:
        self.maximum = maximum
        self.recover_after = recover_after
        #: Create calls that may be on the wire at once now.
        self.limit = min(1, maximum)
        #: Clean calls in a row that earn one more call at once: ``open_after`` until the
        #: first contention, ``recover_after`` from then on.
        self._needed = open_after
        self._clean = 0
        self._on_wire = 0
        self._freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of ``limit`` places on the wire for one call."""
        while self._on_wire >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        self._on_wire += 1
        try:
            yield
        finally:
            self._on_wire -= 1
            self._freed.set()

    def contended(self) -> None:
        """A call met database contention: one call at a time from now on."""
        self._clean = 0
        self._needed = self.recover_after
        if self.limit > 1:
            self._set(1, "the server refused items for database contention")

    def clean(self) -> None:
        """A call met no contention: after enough in a row, one more call at once."""
        self._clean += 1
        if self.limit < self.maximum and self._clean >= self._needed:
            self._clean = 0
            self._set(self.limit + 1, f"{self._needed} calls in a row without contention")

    def _set(self, limit: int, reason: str) -> None:
        log.info("gateway.call_limit", limit=limit, previous=self.limit, reason=reason)
        self.limit = limit


class CallSize:
    """Owns how many runs one create call carries: at most ``maximum`` (``submit_batch_size``),
    fewer while the server creates them slowly, so that one call lasts about ``target_s``.

    A job that arrives while another submits thousands of runs waits for the calls in
    flight to return before its own runs go out: on a SQLite-backed server
    a call of 100 runs lasts about three seconds, one of 30 about one. The server's
    speed is learnt from the calls that created runs (seconds per run created, a moving
    average); a call whose items were all refused tells nothing about it. Until a call
    has created runs, calls carry ``minimum``: the first runs are created sooner (a
    first call of 100 on SQLite took 1.6 s) and the speed is learnt from a short call.
    """

    def __init__(self, maximum: int, *, target_s: float = 1.0, minimum: int = 10) -> None:
        self.maximum = maximum
        self.target_s = target_s
        self.minimum = min(minimum, maximum)
        self._per_run_s: float | None = None

    @property
    def size(self) -> int:
        """Runs in the next call."""
        if self._per_run_s is None:
            return self.minimum
        fits = int(self.target_s / self._per_run_s) if self._per_run_s > 0 else self.maximum
        return max(self.minimum, min(self.maximum, fits))

    def observe(self, seconds: float, created: int) -> None:
        """A call took ``seconds`` and created ``created`` runs."""
        if created <= 0:
            return
        per_run = seconds / created
        old = self._per_run_s
        self._per_run_s = per_run if old is None else 0.7 * old + 0.3 * per_run
