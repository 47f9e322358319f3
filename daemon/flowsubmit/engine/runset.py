"""A set of runs of one deployment: created by idempotency key, watched, recorded once, retried, cancelled, summed up.

The daemon's executor (a job's stage) and the library's ``FlowSubmission`` are both
built on ``RunSet``; what differs between them comes in through three small objects:
a ``RunReporter`` (the daemon writes structlog events, the library stdlib
``logging`` messages), an optional ``RunLedger`` (the daemon's journal, which makes
creations and finals survive a restart) and the engine (gateway and tracker), which
the library opens and closes lazily and the daemon keeps for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from flowsubmit._types import Deployment, GatewayProtocol, RunRequest, RunSnapshot
from flowsubmit.engine.results import RunRecord, Summary, finished_message
from flowsubmit.engine.tracker import Tracker
from flowsubmit.errors import GatewayError, JobRejected
from flowsubmit.gateway.convert import first_parameter_problem

__all__ = [
    "CANCEL_GRACE_S",
    "RunLedger",
    "RunReporter",
    "RunSet",
    "first_parameter_error",
    "idempotency_key",
    "job_tag",
    "parameter_error",
    "submission_key",
    "submission_tag",
]

#: After cancelling runs, how long a run-set waits for them to reach a final state.
CANCEL_GRACE_S = 10.0


def _key(scope: str, deployment_id: str, owner: str, index: int, attempt: int) -> str:
    # The deployment id is in the key because Prefect scopes idempotency keys per flow.
    return f"{scope}/{deployment_id}/{owner}/{index}/{attempt}"


def idempotency_key(deployment_id: str, job_id: str, stage: int, index: int, attempt: int) -> str:
    """The key of one creation by the daemon: ``flowsubmit/DEPLOYMENT/JOB/STAGE/INDEX/ATTEMPT``."""
    return _key("flowsubmit", deployment_id, f"{job_id}/{stage}", index, attempt)


def submission_key(deployment_id: str, submission_id: str, index: int, attempt: int) -> str:
    """The key of one creation by the library: ``flowsubmit-lib/DEPLOYMENT/SUBMISSION/INDEX/ATTEMPT``."""
    return _key("flowsubmit-lib", deployment_id, submission_id, index, attempt)


def job_tag(job_id: str) -> str:
    """The tag that marks every run of one daemon job (to find them on the server)."""
    return f"flowsubmit-job:{job_id}"


def submission_tag(submission_id: str) -> str:
    """The tag on every run of one library submission: its tracker subscribes to exactly these runs."""
    return f"flowsubmit-submission:{submission_id}"


def parameter_error(
    deployment: Deployment, parameters: dict[str, Any], where: str
) -> JobRejected | None:
    """Why Prefect would refuse ``parameters`` (or accept them and then crash), naming ``where``; or None."""
    return first_parameter_error(deployment, [parameters], lambda _: where)


def first_parameter_error(
    deployment: Deployment, runs: Sequence[dict[str, Any]], where: Callable[[int], str]
) -> JobRejected | None:
    """Why Prefect would refuse the parameters of the first of ``runs`` it would refuse, naming
    ``where(its position)``; or None. One schema validation for all of them."""
    problem = first_parameter_problem(deployment, runs)
    if problem is None:
        return None
    position, reason, parameter = problem
    return JobRejected(
        f"{where(position)}: {reason}",
        field=f"parameters.{parameter}" if parameter else "parameters",
    )


class RunReporter(Protocol):
    """Where a run-set's events go; one implementation per face."""

    def submitted(self, record: RunRecord, run_id: str) -> None:
        """A run was created (or found by its key) for the record's current attempt."""

    def retrying(self, record: RunRecord, previous: RunSnapshot, run_id: str) -> None:
        """A run that did not complete was submitted again as ``run_id``."""

    def finished(self, record: RunRecord, snap: RunSnapshot, message: str) -> None:
        """A run reached its final state; ``message`` is the ✅/❌ sentence.

        ``snap`` is the final as the record keeps it: its state message is masked.
        """

    def cancelled(self, record: RunRecord, run_id: str, snap: RunSnapshot | None) -> None:
        """Prefect was asked to cancel a run; ``snap`` is the state it answered with."""

    def cancel_failed(self, record: RunRecord, run_id: str, error: GatewayError) -> None:
        """Prefect could not be asked to cancel a run (the others are cancelled all the same)."""


class RunLedger(Protocol):
    """Durable memory of creations and finals (the daemon's journal); the library has none."""

    def created(self, record: RunRecord, attempt: int) -> str | None:
        """The run created before for this attempt, if any."""

    def final(self, run_id: str) -> RunSnapshot | None:
        """The final state recorded before for this run, if any."""

    def add_created(self, record: RunRecord, attempt: int, run_id: str) -> None:
        """Remember a creation (durably, before it counts)."""

    def add_final(self, record: RunRecord, snap: RunSnapshot) -> None:
        """Remember a final state of one of ``record``'s runs (durably, before it counts)."""


class RunSet:
    """Owns the records of a set of runs of one deployment and the watch of every run created.

    A final state is recorded in one place (``_record``): the record, the ledger,
    the reporter's line and ``on_final``, once per run, whichever way it arrived
    (event, read, cancel answer or ledger).
    """

    def __init__(
        self,
        deployment: Deployment,
        *,
        key: Callable[[str, int, int], str],
        tags: Iterable[str],
        reporter: RunReporter,
        work_queue_name: str | None = None,
        lane: str = "",
        priority: int = 0,
        ledger: RunLedger | None = None,
        on_final: Callable[[RunRecord, RunSnapshot], None] | None = None,
        on_state: Callable[[RunRecord, str, int], None] | None = None,
        recovered: bool = False,
        new_keys: bool = True,
    ) -> None:
        self.deployment = deployment
        self.tags = tuple(tags)
        self.work_queue_name = work_queue_name
        #: Who the runs belong to and how urgent they are, for the gateway's create scheduling.
        self.lane, self.priority = lane, priority
        self._key = key
        self._reporter = reporter
        self._ledger = ledger
        self._on_final = on_final
        #: Called with a run not final yet whose tracker state code changed (``tracker.LATE``...).
        self._on_state = on_state
        #: Runs may have ended while nobody listened: ask the tracker for a read when watching.
        self._recovered = recovered
        #: The keys were never used before (a new job, a new library submission): a run the
        #: create call returns was made by that call, not found again by its key.
        self._new_keys = new_keys and not recovered
        self.records: dict[int, RunRecord] = {}
        self._owner: dict[str, RunRecord] = {}
        self._finals: dict[str, RunSnapshot] = {}
        #: Why flowsubmit asked Prefect to cancel a run (``cancel_unfinished``), by run id.
        self._cancel_reasons: dict[str, str] = {}
        self._gateway: GatewayProtocol | None = None
        self._tracker: Tracker | None = None
        #: Who waits in ``wait``: the runs each still waits for, and its future. No future
        #: per run: a pending run costs the tracker's record and this set's ``_owner`` entry.
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []
        #: The tracker's listener for every run of the set: one bound method, not one per run.
        self._listener = self._heard
        #: The context of the first watch, where every final is recorded (and its line logged).
        self._context: contextvars.Context | None = None

    # -- engine --------------------------------------------------------------------------

    def attach(self, gateway: GatewayProtocol, tracker: Tracker) -> None:
        """Use this engine from now on; every run not final yet is watched through it."""
        self._gateway, self._tracker = gateway, tracker
        unfinished = self.unfinished()
        for run_id in unfinished:
            self._watch(run_id)
        if unfinished:
            tracker.reconcile_soon()  # they may have ended while nothing was subscribed

    def detach(self) -> None:
        """Stop using the engine (it is being closed); ``attach`` watches the runs again.

        Whoever waits in ``wait`` returns (the runs it waits for are not final).
        """
        self._gateway, self._tracker = None, None
        self._wake_waiters()

    def _engine(self) -> tuple[GatewayProtocol, Tracker]:
        if self._gateway is None or self._tracker is None:
            raise RuntimeError("the run-set has no engine attached")
        return self._gateway, self._tracker

    # -- runs ------------------------------------------------------------------------------

    def add(self, record: RunRecord) -> RunRecord:
        """Take a run to create (``record.index`` is unique in the set)."""
        self.records[record.index] = record
        return record

    def check(self, record: RunRecord, where: str) -> JobRejected | None:
        """Why Prefect would refuse the run's parameters (or accept and then crash on them), or None."""
        return parameter_error(self.deployment, record.parameters, where)

    def request(self, record: RunRecord, attempt: int) -> RunRequest:
        """What creating one attempt of a run sends to Prefect (the key makes it repeatable)."""
        return RunRequest(
            idempotency_key=self._key(self.deployment.id, record.index, attempt),
            parameters=record.parameters,
            tags=tuple(dict.fromkeys([*self.tags, *record.tags])),
            job_variables=record.job_variables,
            work_queue_name=self.work_queue_name,
            name=record.name,
            lane=self.lane,
            priority=self.priority,
        )

    async def create(self, record: RunRecord) -> str:
        """Create the record's next attempt (or find the one the ledger knows) and watch it.

        Raises:
            GatewayError: Prefect refused the creation, or stayed unreachable.
        """
        gateway, _ = self._engine()
        attempt = len(record.run_ids)
        record.attempts = attempt + 1
        run_id = self._ledger.created(record, attempt) if self._ledger else None
        sent = None
        if run_id is None:
            sent = datetime.now(UTC) if self._new_keys else None
            run_id = await gateway.create_run(self.deployment, self.request(record, attempt))
            if self._ledger is not None:
                self._ledger.add_created(record, attempt, run_id)
            self._reporter.submitted(record, run_id)
        previous = self._finals.get(record.run_ids[-1]) if record.run_ids else None
        record.add_run(run_id)
        self._owner[run_id] = record
        if previous is not None:
            self._reporter.retrying(record, previous, run_id)
        self._watch(run_id, created_since=sent)
        return run_id

    async def wait(self, run_ids: Iterable[str]) -> None:
        """Wait until the given runs of this set are final (or the engine is detached, or the runs abandoned)."""
        left = {r for r in run_ids if r not in self._finals}
        if not left or self._tracker is None:
            return
        waiter: tuple[set[str], asyncio.Future[None]] = (
            left,
            asyncio.get_running_loop().create_future(),
        )
        self._waiters.append(waiter)
        try:
            await waiter[1]
        finally:
            self._waiters.remove(waiter)

    def _wake_waiters(self) -> None:
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)

    def _watch(self, run_id: str, created_since: datetime | None = None) -> None:
        known = self._ledger.final(run_id) if self._ledger else None
        if known is not None:
            self._record(run_id, known, report=False)  # its line was written before the restart
            return
        _, tracker = self._engine()
        if run_id in self._finals:
            return
        if self._context is None:
            self._context = contextvars.copy_context()
        tracker.follow(run_id, self._listener, created_since=created_since)
        if self._recovered:
            tracker.reconcile_soon()

    def _heard(self, run_id: str, final: RunSnapshot | None) -> None:
        """The tracker's listener: record the final, or pass on a state change, in the context of the first watch (its log lines' job and stage)."""
        if self._context is None:
            return
        if final is not None:
            self._context.run(self._record, run_id, final)
        elif self._on_state is not None and self._tracker is not None:
            self._context.run(
                self._on_state, self._owner[run_id], run_id, self._tracker.state(run_id)
            )

    def _record(self, run_id: str, snap: RunSnapshot, *, report: bool = True) -> None:
        """The one place a final state is recorded: record, ledger, line, hook; once per run."""
        if run_id in self._finals:
            return
        record = self._owner[run_id]
        snap = self._cancelled_because(run_id, snap)
        if self._ledger is not None and self._ledger.final(run_id) is None:
            self._ledger.add_final(record, snap)
        self._finals[run_id] = snap
        kept = record.record(snap)
        if report:
            self._reporter.finished(record, kept, finished_message(self.deployment.name, kept))
        if self._on_final is not None:
            self._on_final(record, kept)
        for left, future in self._waiters:
            left.discard(run_id)
            if not left and not future.done():
                future.set_result(None)

    # -- reading ---------------------------------------------------------------------------

    def latest(self) -> list[str]:
        """The latest attempt's run id of every record that has one, in index order."""
        return [r.run_ids[-1] for r in self.ordered() if r.run_ids]

    def ordered(self) -> list[RunRecord]:
        """The records in index order."""
        return [self.records[i] for i in sorted(self.records)]

    def snapshot(self, run_id: str) -> RunSnapshot | None:
        """The final state of a run of this set, if final."""
        return self._finals.get(run_id)

    def unfinished(self) -> list[str]:
        """The latest runs not final yet, in index order."""
        return [r for r in self.latest() if r not in self._finals]

    def state_counts(self) -> tuple[int, int, int]:
        """Its watched runs not final yet, by state code (``tracker.STATE_NAMES``): no pass over the runs."""
        return self._tracker.counts(self._listener) if self._tracker is not None else (0, 0, 0)

    def waits_in(self) -> tuple[str | None, str | None]:
        """Where its runs wait for a worker, as a Late warning names it: (the deployment's
        work pool, the work queue: its own, else the deployment's)."""
        deployment = self.deployment
        return deployment.work_pool_name, self.work_queue_name or deployment.work_queue_name

    def owner(self, run_id: str) -> RunRecord | None:
        """The record a run was created for."""
        return self._owner.get(run_id)

    def summary(self) -> Summary:
        """The counts and sentence of the latest attempts."""
        return Summary.of(self.ordered())

    # -- cancelling ------------------------------------------------------------------------

    async def cancel_unfinished(
        self, grace_s: float = CANCEL_GRACE_S, reason: str | None = None
    ) -> list[str]:
        """Ask Prefect to cancel every run not final yet, then give them ``grace_s`` to end.

        ``reason`` says why (``cancelled by flowsubmit: ...``): it is the message of the
        Cancelling state flowsubmit sets in Prefect, and the ``state_message`` recorded
        for each of these runs that ends Cancelled (instead of the runner's own
        "Flow run was cancelled successfully.").

        One batched read first, so that runs which ended a moment ago are recorded as
        they ended (Prefect would refuse to cancel them anyway). A refused cancel is
        reported and the others are cancelled all the same. A Scheduled run has nothing
        to stop and ends Cancelled at once; a running one ends when its worker or
        runner has stopped it. Returns the run ids cancellation was asked for.
        """
        gateway, tracker = self._engine()
        unfinished = self.unfinished()
        if not unfinished:
            return []
        try:
            current = {s.flow_run_id: s for s in await gateway.read_runs(unfinished)}
        except GatewayError:
            current = {}
        for snap in current.values():
            self._observe(tracker, snap)
        asked = [r for r in unfinished if r not in self._finals]
        for run_id in asked:
            record = self._owner[run_id]
            if reason:
                self._cancel_reasons[run_id] = reason
            try:
                answer = await gateway.cancel_run(run_id, reason)
            except GatewayError as exc:
                self._reporter.cancel_failed(record, run_id, exc)
                continue
            self._reporter.cancelled(record, run_id, answer)
            if answer is not None:
                self._observe(tracker, answer)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.wait(asked)
        return asked

    def _cancelled_because(self, run_id: str, snap: RunSnapshot) -> RunSnapshot:
        """A run flowsubmit cancelled and that ended Cancelled: its message says why flowsubmit cancelled it."""
        reason = self._cancel_reasons.get(run_id)
        if reason is None or snap.state_type != "CANCELLED":
            return snap
        return replace(snap, state_message=reason)

    def _observe(self, tracker: Tracker, snap: RunSnapshot) -> None:
        """Hand a read or cancel answer to the tracker, and record it now if it is final."""
        final = tracker.observe(snap)
        if final is not None and snap.flow_run_id in self._owner:
            self._record(snap.flow_run_id, final)

    def abandon(self) -> None:
        """Stop watching the runs not final yet (their owner no longer waits for them)."""
        _, tracker = self._engine()
        for run_id in self.unfinished():
            tracker.forget(run_id)
        self._wake_waiters()
