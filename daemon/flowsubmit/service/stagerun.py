"""One stage of a job in flight: its runs created within their limits, retried, and waited for without a task each.

A run holds its stage's slot (``max_concurrency``) and its producer's slot
(``max_runs_in_flight``) from before its first creation until it ends: it
completes, runs out of attempts, or cannot be created. A task exists only while a
creation is in flight (at most ``CREATES_IN_FLIGHT`` of a stage at once, enough
for the gateway to fill its bulk calls); a created run waits as its record and
the tracker's entry alone, and its final state, recorded by the run-set, comes
back through ``finished``, which ends the run or creates its next attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from flowsubmit._types import RunSnapshot
from flowsubmit.engine.results import RunRecord
from flowsubmit.engine.runset import RunSet
from flowsubmit.errors import PermanentGatewayError, TransientGatewayError
from flowsubmit.jobs.model import Stage
from flowsubmit.logs import get_logger

__all__ = ["CREATES_IN_FLIGHT", "StageRun"]

log = get_logger("flowsubmit.executor")

#: Creations of one stage in flight at once: 10 bulk calls' worth, so the gateway's
#: batches stay full while a task per creation, not per run, is kept.
CREATES_IN_FLIGHT = 1_000


class StageRun:
    """Owns one stage's runs in flight: their slots, their creations and the decision to retry.

    ``run()`` returns when every run of the stage has ended; ``finished`` is the
    run-set's ``on_final`` hook while it runs, ignored once it has returned (a job
    interrupted records its last finals without creating anything again).
    """

    def __init__(
        self,
        stage: Stage,
        runs: RunSet,
        *,
        producer_slots: asyncio.Semaphore | None,
        abort: Callable[[str], None],
    ) -> None:
        self._runs = runs
        self._attempts = stage.retries + 1
        self._slots = asyncio.Semaphore(stage.max_concurrency or max(1, len(runs.records)))
        self._producer_slots = producer_slots
        self._creating = asyncio.Semaphore(CREATES_IN_FLIGHT)
        self._abort = abort
        self._left = 0
        #: Runs holding a producer slot: released when they end, or when the stage is left.
        self._holding = 0
        self._done: asyncio.Future[None] | None = None
        self._group: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        """Create every run of the stage (and its retries) and wait until each has ended."""
        records = self._runs.ordered()
        if not records:
            return
        self._left = len(records)
        self._done = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as self._group:
                self._group.create_task(self._feed(records))
                await self._done
        finally:
            self._group = None  # late finals end nothing and create nothing
            self._release_producer(self._holding)

    async def _feed(self, records: list[RunRecord]) -> None:
        for record in records:
            await self._slots.acquire()
            if self._producer_slots is not None:
                await self._producer_slots.acquire()
                self._holding += 1
            await self._creating.acquire()
            self._spawn(record, holding_creation=True)

    def _spawn(self, record: RunRecord, *, holding_creation: bool) -> None:
        if self._group is not None:
            self._group.create_task(self._create(record, holding_creation))

    async def _create(self, record: RunRecord, holding_creation: bool) -> None:
        if not holding_creation:
            await self._creating.acquire()
        try:
            await self._runs.create(record)
        except PermanentGatewayError as exc:
            record.creation_failed(str(exc))
            log.error("run.refused", index=record.index, error=str(exc))
            self._end()
        except TransientGatewayError as exc:
            # The gateway retried for prefect_outage_tolerance_s: the job fails as a whole.
            record.creation_failed(str(exc))
            self._abort(f"Prefect unreachable beyond prefect_outage_tolerance_s: {exc}")
            self._end()
        finally:
            self._creating.release()

    def finished(self, record: RunRecord, snap: RunSnapshot) -> None:
        """A run's final state was recorded: it ends, or its next attempt is created."""
        if self._group is None:
            return
        if snap.succeeded or record.attempts >= self._attempts:
            self._end()
        else:
            self._spawn(record, holding_creation=False)

    def _end(self) -> None:
        """One run has ended: its slots are free; the stage is over with its last run."""
        self._release_producer(min(1, self._holding))
        self._slots.release()
        self._left -= 1
        if self._left == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _release_producer(self, count: int) -> None:
        """Give back ``count`` producer slots (they count the producer's runs in flight over all its jobs)."""
        if self._producer_slots is None:
            return
        self._holding -= count
        for _ in range(count):
            self._producer_slots.release()
