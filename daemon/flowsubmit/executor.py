"""Runs one claimed job: pre-submit checks, stages in order, concurrency, retries, timeout and cancel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from flowsubmit import metrics
from flowsubmit._types import Deployment, GatewayProtocol, JobStatus, RunRequest, RunSnapshot
from flowsubmit.errors import (
    GatewayError,
    JobRejected,
    PermanentGatewayError,
    TransientGatewayError,
)
from flowsubmit.gateway import parameter_problem
from flowsubmit.jobs import DEPLOYMENT_HINT, Job, RunSpec, Stage
from flowsubmit.journal import Journal, JournalState, snapshot_record
from flowsubmit.policy import Producer
from flowsubmit.results import RunRecord, finished_message, result_document, summary_line
from flowsubmit.tracker import Tracker

__all__ = ["Executor", "JobOutcome", "idempotency_key", "job_tag", "prepare"]

log = structlog.get_logger("flowsubmit.executor")


#: After cancelling a job's runs, how long it waits for them to reach a final state.
CANCEL_GRACE_S = 10.0


def idempotency_key(deployment_id: str, job_id: str, stage: int, index: int, attempt: int) -> str:
    """The key of one creation. It carries the deployment id because Prefect scopes keys per flow."""
    return f"flowsubmit/{deployment_id}/{job_id}/{stage}/{index}/{attempt}"


def job_tag(job_id: str) -> str:
    """The tag that marks every run of one job (to find them on the server)."""
    return f"flowsubmit-job:{job_id}"


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended and its result document."""

    status: JobStatus
    result: dict[str, Any]


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
    ) -> None:
        self.job = job
        self.job_id = job_id
        self._gateway = gateway
        self._tracker = tracker
        self._journal = journal
        self._state = state
        self._run_tag = run_tag
        self._records: dict[tuple[int, int], RunRecord] = {}
        self._deadline: asyncio.Timeout | None = None
        self._cancel_requested = False
        self._abort_reason: str | None = None
        #: A job resumed after a restart: its runs may have ended while nobody listened.
        self._recovered = recovered
        #: Who dropped the job (#14): tagged on every run, recorded in the result.
        self._producer = producer

    # -- public ---------------------------------------------------------------------------

    @property
    def progress(self) -> tuple[int, int]:
        """(runs final, runs known) so far."""
        finished = sum(1 for r in self._records.values() if r.state_type is not None)
        return finished, len(self._records)

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

    async def prepare(self) -> list[tuple[Stage, Deployment]]:
        """``prepare(job, gateway)`` for this job: the checks before anything is created."""
        return await prepare(self.job, self._gateway)

    async def run(self, prepared: list[tuple[Stage, Deployment]]) -> JobOutcome:
        """Run the stages; never raises for failed runs (they are data in the result)."""
        started = datetime.now(UTC)
        status, error = JobStatus.SUCCEEDED, None
        try:
            async with asyncio.timeout(self.job.timeout) as self._deadline:
                if self._cancel_requested or self._abort_reason is not None:
                    self._deadline.reschedule(asyncio.get_running_loop().time())
                status, error = await self._run_stages(prepared)
        except TimeoutError:
            status, error = await self._interrupted()
        records = list(self._records.values())
        result = result_document(
            job_id=self.job_id,
            status=status,
            started_at=started,
            ended_at=datetime.now(UTC),
            records=records,
            error=error,
            producer=self._producer.as_dict() if self._producer else None,
        )
        summary = result["summary"]
        log.info(
            "job.summary",
            status=status.value,
            total=summary["total"],
            succeeded=summary["succeeded"],
            failed=summary["failed"],
            by_state=summary["by_state"],
            duration_s=result["duration_s"],
            message=summary_line(summary["succeeded"], summary["total"]),
        )
        return JobOutcome(status, result)

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
        if self._cancel_requested or self.job.on_timeout == "cancel":
            await self._cancel_unfinished()
        return status, None

    # -- stages -----------------------------------------------------------------------------

    async def _run_stages(
        self, prepared: list[tuple[Stage, Deployment]]
    ) -> tuple[JobStatus, str | None]:
        for stage_index, (stage, deployment) in enumerate(prepared):
            specs = stage.expand(stage_index)
            for spec in specs:
                self._records[(spec.stage, spec.index)] = RunRecord(
                    spec.stage, spec.index, deployment.name, spec.parameters
                )
            with bound_contextvars(deployment=deployment.name, stage=stage_index):
                await self._run_stage(stage, deployment, specs)
            if not all(self._records[(s.stage, s.index)].succeeded for s in specs):
                left = len(prepared) - stage_index - 1
                error = (
                    f"stage {stage_index} did not complete in full; {left} later stage(s) not started"
                    if left
                    else None
                )
                return JobStatus.FAILED, error
        return JobStatus.SUCCEEDED, None

    async def _run_stage(self, stage: Stage, deployment: Deployment, specs: list[RunSpec]) -> None:
        slots = asyncio.Semaphore(stage.max_concurrency or len(specs))
        async with asyncio.TaskGroup() as tg:
            for spec in specs:
                tg.create_task(self._run_one(stage, deployment, spec, slots))

    async def _run_one(
        self, stage: Stage, deployment: Deployment, spec: RunSpec, slots: asyncio.Semaphore
    ) -> None:
        record = self._records[(spec.stage, spec.index)]
        async with slots:
            for attempt in range(stage.retries + 1):
                record.attempts = attempt + 1
                try:
                    run_id = await self._created_run(stage, deployment, spec, attempt)
                except PermanentGatewayError as exc:
                    record.error, record.state_name = str(exc), "NotCreated"
                    log.error("run.refused", index=spec.index, error=str(exc))
                    return
                except TransientGatewayError as exc:
                    # The gateway retried for prefect_outage_tolerance_s: the job fails as a whole.
                    record.error, record.state_name = str(exc), "NotCreated"
                    self.abort(f"Prefect unreachable beyond prefect_outage_tolerance_s: {exc}")
                    return
                record.flow_run_id = run_id
                snap = await self._final_state(run_id, deployment.name, spec)
                record.record(snap)
                if snap.succeeded:
                    return
                if attempt < stage.retries:
                    log.info(
                        "run.retrying",
                        index=spec.index,
                        flow_run_id=run_id,
                        state=snap.state_name,
                        attempt=attempt + 2,
                    )

    async def _created_run(
        self, stage: Stage, deployment: Deployment, spec: RunSpec, attempt: int
    ) -> str:
        known = self._state.created.get((spec.stage, spec.index, attempt))
        if known is not None:
            return known
        request = RunRequest(
            idempotency_key=idempotency_key(
                deployment.id, self.job_id, spec.stage, spec.index, attempt
            ),
            parameters=spec.parameters,
            tags=tuple(dict.fromkeys([*self._own_tags, *spec.tags])),
            job_variables=stage.job_variables,
            work_queue_name=stage.work_queue_name,
            name=spec.name,
            lane=self.job_id,
            priority=self.job.priority,
        )
        run_id = await self._gateway.create_run(deployment, request)
        self._journal.append(
            "created", stage=spec.stage, index=spec.index, attempt=attempt, flow_run_id=run_id
        )
        self._state.created[(spec.stage, spec.index, attempt)] = run_id
        log.info("run.submitted", index=spec.index, attempt=attempt + 1, flow_run_id=run_id)
        return run_id

    async def _final_state(self, run_id: str, deployment: str, spec: RunSpec) -> RunSnapshot:
        known = self._state.finals.get(run_id)
        if known is not None:
            return known
        waiting = asyncio.shield(self._tracker.watch(run_id))
        if self._recovered:
            self._tracker.reconcile_soon()  # it may have ended while no daemon listened
        return self._record_final(await waiting, deployment, spec)

    def _record_final(self, snap: RunSnapshot, deployment: str, spec: RunSpec) -> RunSnapshot:
        """Journal a run's final state, then log it: the one canonical line per run attempt."""
        self._journal.append("final", **snapshot_record(snap))
        self._state.finals[snap.flow_run_id] = snap
        metrics.observe_detection(snap)
        log.info(
            "run.finished",
            index=spec.index,
            flow_run_id=snap.flow_run_id,
            flow_run_name=snap.flow_run_name,
            state=snap.state_name,
            state_type=snap.state_type,
            source=snap.source,
            message=finished_message(deployment, snap),
        )
        return snap

    async def _cancel_unfinished(self) -> None:
        """Ask Prefect to cancel every run not final yet, then give them ``CANCEL_GRACE_S`` to end.

        A Scheduled run has nothing to stop and ends Cancelled at once; a running one
        ends when its worker or runner has stopped it. What has not ended by then is
        left to Prefect and recorded without a final state.
        """
        stopping: dict[str, RunRecord] = {}
        for record in self._records.values():
            if record.flow_run_id and record.state_type is None:
                snap = await self._cancel(record, record.flow_run_id)
                if snap is not None and snap.final:
                    self._tracker.forget(record.flow_run_id)
                    record.record(self._record_final(snap, record.deployment, _spec_of(record)))
                else:
                    stopping[record.flow_run_id] = record
        if stopping:
            await self._collect_cancelled(stopping)

    async def _cancel(self, record: RunRecord, run_id: str) -> RunSnapshot | None:
        try:
            snap = await self._gateway.cancel_run(run_id)
        except GatewayError as exc:
            log.warning("run.cancel_failed", index=record.index, flow_run_id=run_id, error=str(exc))
            return None
        log.info(
            "run.cancelled", index=record.index, flow_run_id=run_id, state=snap and snap.state_name
        )
        return snap

    async def _collect_cancelled(self, stopping: dict[str, RunRecord]) -> None:
        futures = {self._tracker.watch(run_id): run_id for run_id in stopping}
        done, _ = await asyncio.wait(futures, timeout=CANCEL_GRACE_S)
        for future, run_id in futures.items():
            record = stopping[run_id]
            if future in done and not future.cancelled():
                record.record(
                    self._record_final(future.result(), record.deployment, _spec_of(record))
                )
            else:
                self._tracker.forget(run_id)  # its job no longer waits for it


async def prepare(job: Job, gateway: GatewayProtocol) -> list[tuple[Stage, Deployment]]:
    """Resolve every stage's deployment and check every run before anything is created.

    The daemon makes this check after the claim; ``flowsubmit enqueue --check`` makes
    the same one before the drop.

    Raises:
        JobRejected: unknown deployment, parameters the flow does not take or its
            schema refuses, or a work queue that does not exist.
    """
    prepared: list[tuple[Stage, Deployment]] = []
    for stage_index, stage in enumerate(job.resolved_stages()):
        field = "deployment" if job.stages is None else f"stages.{stage_index}.deployment"
        try:
            deployment = await gateway.resolve_deployment(stage.deployment)
        except PermanentGatewayError as exc:
            raise JobRejected(str(exc), field=field, hint=DEPLOYMENT_HINT) from exc
        await _check_work_queue(job, gateway, stage, deployment, stage_index)
        for spec in stage.expand(stage_index):
            problem = parameter_problem(deployment, spec.parameters)
            if problem is not None:
                reason, parameter = problem
                where = (
                    f"stage {stage_index} run {spec.index}" if job.stages else f"run {spec.index}"
                )
                raise JobRejected(
                    f"{where}: {reason}",
                    field=f"parameters.{parameter}" if parameter else "parameters",
                )
        prepared.append((stage, deployment))
    return prepared


async def _check_work_queue(
    job: Job, gateway: GatewayProtocol, stage: Stage, deployment: Deployment, stage_index: int
) -> None:
    if stage.work_queue_name is None or stage.create_work_queue:
        return
    try:
        await gateway.check_work_queue(deployment, stage.work_queue_name)
    except PermanentGatewayError as exc:
        field = "work_queue_name" if job.stages is None else f"stages.{stage_index}.work_queue_name"
        raise JobRejected(
            str(exc), field=field, hint='set "create_work_queue": true to allow a new queue'
        ) from exc


def _spec_of(record: RunRecord) -> RunSpec:
    return RunSpec(record.stage, record.index, record.parameters)
