"""Runs one claimed job: pre-submit checks, stages in order, concurrency, retries, timeout and cancel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

from flowsubmit import metrics
from flowsubmit._types import Deployment, GatewayProtocol, JobStatus, RunSnapshot
from flowsubmit.engine.results import JobResult, RunRecord
from flowsubmit.engine.runset import (
    CANCEL_GRACE_S,
    RunSet,
    first_parameter_error,
    idempotency_key,
    job_tag,
)
from flowsubmit.engine.tracker import LATE, LATE_HINT, STATE_NAMES, Tracker
from flowsubmit.errors import (
    GatewayError,
    JobRejected,
    PermanentGatewayError,
)
from flowsubmit.jobs.model import DEPLOYMENT_HINT, Job, Stage
from flowsubmit.jobs.plan import PlannedStage
from flowsubmit.jobs.policy import Producer
from flowsubmit.logs import bound_contextvars, get_logger
from flowsubmit.queue.journal import Journal, JournalState, snapshot_record
from flowsubmit.service.stagerun import StageRun

__all__ = ["Executor", "JobOutcome", "prepare"]

log = get_logger("flowsubmit.executor")

#: While a job's runs change state before they end, a ``states`` record (its runs not
#: final yet, counted as scheduled, late and running) is journaled at most this often,
#: and at once on the job's first Late run: ``flowsubmit status`` reads the latest.
STATES_EVERY_S = 2.0


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended and its result document."""

    status: JobStatus
    result: JobResult


class _JournalLedger:
    """The run-set's ledger for a daemon job: its journal, appended before anything counts.

    ``state`` is the journal as replayed at the claim, and is only read: what this
    process appends is on disk for the next one, and in the run-set for this one (a
    creation or final is never looked up again in the process that made it), so a
    pending run costs no entry here.
    """

    def __init__(self, journal: Journal, state: JournalState) -> None:
        self._journal = journal
        self._state = state

    def created(self, record: RunRecord, attempt: int) -> str | None:
        return self._state.created.get((record.stage, record.index, attempt))

    def final(self, run_id: str) -> RunSnapshot | None:
        return self._state.finals.get(run_id)

    def add_created(self, record: RunRecord, attempt: int, run_id: str) -> None:
        self._journal.append(
            "created", stage=record.stage, index=record.index, attempt=attempt, flow_run_id=run_id
        )

    def add_final(self, record: RunRecord, snap: RunSnapshot) -> None:
        # Masked with the run's parameters: a secret parameter's value is hidden too.
        self._journal.append("final", **snapshot_record(snap, record.parameters))


class _JobReporter:
    """The run-set's events as the daemon's structlog lines (``run.*`` in docs/logs.md)."""

    def submitted(self, record: RunRecord, run_id: str) -> None:
        log.info("run.submitted", index=record.index, attempt=record.attempts, flow_run_id=run_id)

    def retrying(self, record: RunRecord, previous: RunSnapshot, run_id: str) -> None:
        log.info(
            "run.retrying",
            index=record.index,
            flow_run_id=previous.flow_run_id,
            state=previous.state_name,
            attempt=record.attempts,
        )

    def finished(self, record: RunRecord, snap: RunSnapshot, message: str) -> None:
        metrics.observe_detection(snap)
        fields = {
            "index": record.index,
            "flow_run_id": snap.flow_run_id,
            "flow_run_name": snap.flow_run_name,
            "state": snap.state_name,
            "state_type": snap.state_type,
            "source": snap.source,
            "message": message,
        }
        if snap.succeeded:
            log.info("run.finished", **fields)
        else:  # a failure is a warning, with Prefect's reason (the flow's exception text)
            log.warning("run.finished", **fields, state_message=snap.state_message)

    def cancelled(self, record: RunRecord, run_id: str, snap: RunSnapshot | None) -> None:
        log.info(
            "run.cancelled", index=record.index, flow_run_id=run_id, state=snap and snap.state_name
        )

    def cancel_failed(self, record: RunRecord, run_id: str, error: GatewayError) -> None:
        log.warning("run.cancel_failed", index=record.index, flow_run_id=run_id, error=str(error))


class Executor:
    """Owns one job's run records while it runs; the queue moves are the service's.

    Every run creation and every final state is appended to the journal before it
    counts, so that a restarted daemon re-attaches instead of creating again.
    """

    def __init__(
        self,
        job: Job,
        job_id: str,
        *,
        gateway: GatewayProtocol,
        tracker: Tracker,
        journal: Journal,
        state: JournalState,
        run_tag: str = "flowsubmit",
        recovered: bool = False,
        producer: Producer | None = None,
        timeout_s: float | None = None,
        producer_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self.job = job
        self.job_id = job_id
        self._gateway = gateway
        self._tracker = tracker
        self._journal = journal
        self._state = state
        self._run_tag = run_tag
        #: The run-sets of the stages started so far (the result lists their runs).
        self._started: list[RunSet] = []
        #: Every stage's run-set, once ``run`` was given them.
        self._prepared: list[tuple[PlannedStage, RunSet]] = []
        self._deadline: asyncio.Timeout | None = None
        self._cancel_requested = False
        self._abort_reason: str | None = None
        #: A job resumed after a restart: its runs may have ended while nobody listened.
        self._recovered = recovered
        #: Who dropped the job: tagged on every run, recorded in the result.
        self._producer = producer
        #: The whole job's deadline: its ``timeout``, or its producer's default.
        self._timeout_s = timeout_s if timeout_s is not None else job.timeout
        #: The producer's runs in flight over all its jobs (``max_runs_in_flight``), if limited.
        self._producer_slots = producer_slots
        #: The stage whose runs are in flight (stages run one after the other).
        self._stage_run: StageRun | None = None
        #: ``job.runs_late`` was logged (once per job).
        self._late_warned = False
        #: The next ``states`` record, when one is due, and the counts the last one wrote.
        self._states_timer: asyncio.TimerHandle | None = None
        self._states_written = [0, 0, 0]
        #: The job has ended: no ``states`` record any more (a change may still be on its way).
        self._states_over = False

    # -- public ---------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the job now: runs still going are cancelled in Prefect, the job ends ``cancelled``.

        Idempotent: the service delivers a request on every scan while the file exists.
        """
        if self._cancel_requested:
            return
        self._cancel_requested = True
        self._expire_deadline()

    def abort(self, reason: str) -> None:
        """Fail the job now with ``reason`` (Prefect unreachable for too long); runs are left alone."""
        if self._abort_reason is None:
            self._abort_reason = reason
        self._expire_deadline()

    def _expire_deadline(self) -> None:
        """End the job's ``asyncio.timeout`` scope now, unless it has already ended."""
        if self._deadline is not None and not self._deadline.expired():
            self._deadline.reschedule(asyncio.get_running_loop().time())

    async def prepare(self) -> list[tuple[PlannedStage, RunSet]]:
        """``prepare(job, gateway)`` for this job, then one run-set per stage.

        Raises:
            JobRejected: unknown deployment, parameters the flow does not take or its
                schema refuses, or a work queue that does not exist.
        """
        checked = await prepare(self.job, self._gateway)
        return [(planned, self._run_set(planned, deployment)) for planned, deployment in checked]

    def _run_set(self, planned: PlannedStage, deployment: Deployment) -> RunSet:
        job_id, stage_index, stage = self.job_id, planned.index, planned.stage
        runs = RunSet(
            deployment,
            key=lambda deployment_id, index, attempt: idempotency_key(
                deployment_id, job_id, stage_index, index, attempt
            ),
            tags=self._own_tags,
            reporter=_JobReporter(),
            work_queue_name=stage.work_queue_name,
            lane=job_id,
            priority=self.job.priority,
            ledger=_JournalLedger(self._journal, self._state),
            recovered=self._recovered,
            on_final=self._finished,
            on_state=lambda record, run_id, code: self._state_changed(runs, run_id, code),
        )
        for spec in planned.runs:
            runs.add(
                RunRecord(
                    spec.stage,
                    spec.index,
                    deployment.name,
                    spec.parameters,
                    tags=spec.tags,
                    job_variables=stage.job_variables,
                    name=spec.name,
                )
            )
        return runs

    def _records(self) -> list[RunRecord]:
        return [record for runs in self._started for record in runs.ordered()]

    async def run(self, prepared: list[tuple[PlannedStage, RunSet]]) -> JobOutcome:
        """Run the stages; never raises for failed runs (they are data in the result)."""
        started = datetime.now(UTC)
        status, error = JobStatus.SUCCEEDED, None
        self._prepared = prepared
        try:
            async with asyncio.timeout(self._timeout_s) as self._deadline:
                if self._cancel_requested or self._abort_reason is not None:
                    self._deadline.reschedule(asyncio.get_running_loop().time())
                status, error = await self._run_stages(prepared)
        except TimeoutError:
            status, error = await self._interrupted()
        self._states_over = True  # the journal closes with the job
        if self._states_timer is not None:
            self._states_timer.cancel()
            self._states_timer = None
        result = JobResult.of(
            job_id=self.job_id,
            status=status,
            started_at=started,
            ended_at=datetime.now(UTC),
            records=[*self._records(), *self._never_started()],
            error=error,
            producer=self._producer.as_dict() if self._producer else None,
        )
        summary = result.summary
        log.info(
            "job.summary",
            status=status.value,
            total=summary.total,
            succeeded=summary.succeeded,
            failed=summary.failed,
            cancelled=summary.cancelled,
            by_state=summary.by_state,
            duration_s=result.duration_s,
            message=summary.line,
        )
        return JobOutcome(status, result)

    def _never_started(self) -> list[RunRecord]:
        """The runs of the stages that never started: each ``NotCreated``, its ``error`` saying why.

        The result accounts for every run the job defined, and its summary counts them.
        """
        left = self._prepared[len(self._started) :]
        if not left:
            return []
        why = f"not started: stage {len(self._started) - 1} did not complete in full"
        if not self._started:
            why = "not started: the job ended before its first stage"
        records = [record for _, runs in left for record in runs.ordered()]
        for record in records:
            record.creation_failed(why)
        return records

    @property
    def _own_tags(self) -> list[str]:
        """The tags flowsubmit puts on every run of this job, before the job's own."""
        producer = [self._producer.tag] if self._producer else []
        return [self._run_tag, job_tag(self.job_id), *producer]

    async def _interrupted(self) -> tuple[JobStatus, str | None]:
        """How a job whose deadline fired ends: aborted, cancelled or timed out."""
        if self._abort_reason is not None:
            return JobStatus.FAILED, self._abort_reason  # Prefect is gone: nothing to cancel
        status = JobStatus.CANCELLED if self._cancel_requested else JobStatus.TIMED_OUT
        stopping = self._cancel_requested or self.job.on_timeout == "cancel"
        why = (
            "cancelled on request (flowsubmit cancel)"
            if self._cancel_requested
            else f"timed out after {self._timeout_s:g} s (timeout)"
        )
        for runs in self._started:
            if stopping:
                await runs.cancel_unfinished(
                    CANCEL_GRACE_S, _cancel_reason(self._cancel_requested, why)
                )
            runs.abandon()  # what has not ended is left to Prefect, recorded without a final state
        if status is JobStatus.CANCELLED:
            return status, why
        fate = "cancelled" if stopping else "left running (on_timeout: leave)"
        return status, f"{why}; runs not final were {fate}"

    # -- stages -----------------------------------------------------------------------------

    async def _run_stages(
        self, prepared: list[tuple[PlannedStage, RunSet]]
    ) -> tuple[JobStatus, str | None]:
        for stage_index, (planned, runs) in enumerate(prepared):
            runs.attach(self._gateway, self._tracker)
            self._started.append(runs)
            with bound_contextvars(deployment=runs.deployment.name, stage=stage_index):
                await self._run_stage(planned.stage, runs)
            if not all(record.succeeded for record in runs.ordered()):
                left = len(prepared) - stage_index - 1
                error = (
                    f"stage {stage_index} did not complete in full; {left} later stage(s) not started"
                    if left
                    else None
                )
                return JobStatus.FAILED, error
        return JobStatus.SUCCEEDED, None

    async def _run_stage(self, stage: Stage, runs: RunSet) -> None:
        """The retry policy: up to ``stage.retries`` more attempts while a run does not complete."""
        self._stage_run = StageRun(
            stage, runs, producer_slots=self._producer_slots, abort=self.abort
        )
        try:
            await self._stage_run.run()
        finally:
            self._stage_run = None

    def _finished(self, record: RunRecord, snap: RunSnapshot) -> None:
        """The run-sets' ``on_final``: the stage running decides what follows a run's end."""
        if self._states_written != [0, 0, 0] and not self._states_over:
            self._states_soon(STATES_EVERY_S)  # a late or running run may have ended
        if self._stage_run is not None:
            self._stage_run.finished(record, snap)

    # -- runs not final yet: scheduled, late, running -----------------------------------------

    def _state_changed(self, runs: RunSet, run_id: str, code: int) -> None:
        """The run-sets' ``on_state``: warn of the job's first Late run, and count the states soon."""
        if self._states_over:
            return
        if code == LATE and not self._late_warned:
            self._late_warned = True
            work_pool, work_queue = runs.waits_in()
            log.warning(
                "job.runs_late",
                deployment=runs.deployment.name,
                work_pool=work_pool,
                work_queue=work_queue,
                flow_run_id=run_id,
                hint=LATE_HINT,
            )
            self._write_states()
            return
        self._states_soon(STATES_EVERY_S)

    def _states_soon(self, delay_s: float) -> None:
        if self._states_timer is None:
            loop = asyncio.get_running_loop()
            self._states_timer = loop.call_later(delay_s, self._write_states)

    def _write_states(self) -> None:
        """Journal the runs not final yet by state (``STATE_NAMES``), unless the counts are the last ones written."""
        if self._states_timer is not None:
            self._states_timer.cancel()
            self._states_timer = None
        counts = [0, 0, 0]
        for runs in self._started:
            for code, count in enumerate(runs.state_counts()):
                counts[code] += count
        if counts != self._states_written:
            self._states_written = counts
            self._journal.append("states", **dict(zip(STATE_NAMES, counts, strict=True)))


async def prepare(job: Job, gateway: GatewayProtocol) -> list[tuple[PlannedStage, Deployment]]:
    """Resolve every stage's deployment and check every run before anything is created.

    The daemon makes this check after the claim; ``flowsubmit enqueue --check`` makes
    the same one before the drop.

    Raises:
        JobRejected: unknown deployment, parameters the flow does not take or its
            schema refuses, or a work queue that does not exist.
    """
    prepared: list[tuple[PlannedStage, Deployment]] = []
    for planned in job.plan.stages:
        try:
            deployment = await gateway.resolve_deployment(planned.stage.deployment)
        except PermanentGatewayError as exc:
            raise JobRejected(
                str(exc), field=planned.field("deployment"), hint=DEPLOYMENT_HINT
            ) from exc
        await _check_work_queue(gateway, planned, deployment)
        problem = first_parameter_error(
            deployment, [spec.parameters for spec in planned.runs], planned.where_at
        )
        if problem is not None:
            raise problem
        prepared.append((planned, deployment))
    return prepared


async def _check_work_queue(
    gateway: GatewayProtocol, planned: PlannedStage, deployment: Deployment
) -> None:
    stage = planned.stage
    if stage.work_queue_name is None or stage.create_work_queue:
        return
    try:
        await gateway.check_work_queue(deployment, stage.work_queue_name)
    except PermanentGatewayError as exc:
        raise JobRejected(
            str(exc),
            field=planned.field("work_queue_name"),
            hint='set "create_work_queue": true to allow a new queue',
        ) from exc


def _cancel_reason(requested: bool, why: str) -> str:
    """The state message of the runs a job's end cancels (in Prefect and in the result)."""
    if requested:
        return "cancelled by flowsubmit: the job was cancelled on request (flowsubmit cancel)"
    return f"cancelled by flowsubmit: the job {why}"
