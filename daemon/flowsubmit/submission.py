"""The library API: ``flow_submitter(...)`` fans runs of one deployment out, ``wait()`` fans their final states in.

Lifecycle. A submission owns at most one *engine* at a time: a
``Gateway`` (Prefect client) and a ``Tracker`` (one event subscription for every
run of the submission, with batched polling as reconciliation and fallback). The
engine is opened lazily by the first call that needs Prefect, with the
subscription up *before* the first run is created, and is torn down tracker first.

- ``async with flow_submitter(...) as s:`` keeps the engine open until the block
  ends; ``aclose()`` does the same at any time. A closed submission refuses use.
- Plain use (no ``async with``) needs no finalizer: ``wait()`` always closes the
  engine when it returns or raises (also on ``WaitTimeout``), unless another call
  of the same submission is still running, and so does any call that ends with no
  run left unfinished. A later ``submit()``, ``wait()``, ``retry_failed()`` or
  ``cancel()`` opens a fresh engine and watches again every run still unfinished;
  its first batched read catches whatever finished while nothing was subscribed.
  So a submission may take more runs after a ``wait()``, and the only way to leave
  something open is to ``submit()`` and never ``wait()`` nor ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from flowsubmit._types import RunSnapshot
from flowsubmit.engine.results import RunRecord
from flowsubmit.engine.runset import CANCEL_GRACE_S, RunSet, submission_key, submission_tag
from flowsubmit.engine.tracker import LATE, Tracker
from flowsubmit.errors import (
    AuthenticationError,
    ClosedError,
    GatewayError,
    IncompatibleServer,
    PermanentGatewayError,
    TransientGatewayError,
    WaitTimeout,
)
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.job_events import Event, emit_job_event, job_event
from flowsubmit.gateway.translate import ATTEMPT_FLOOR_S
from flowsubmit.jobs.model import deployment_name_problem
from flowsubmit.library_log import SubmissionReporter

__all__ = ["FlowSubmission", "flow_submitter", "run_batch"]

#: How long opening an engine waits for the event subscription before creating runs
#: anyway (if the stream is late, the tracker's reconciliation reads catch up).
CONNECT_TIMEOUT_S = 10.0

#: How often ``wait()`` looks at how long the tracker's reads have been failing.
OUTAGE_CHECK_S = 1.0


def flow_submitter(
    deployment: str,
    *,
    max_concurrency: int | None = None,
    poll_interval: float = 5.0,
    tags: Iterable[str] = (),
    job_variables: Mapping[str, Any] | None = None,
    work_queue_name: str | None = None,
    submission_id: str | None = None,
    outage_tolerance_s: float = 60.0,
    events: bool = False,
) -> FlowSubmission:
    """Start a submission of runs of ``deployment``; nothing talks to Prefect until the first call.

    Args:
        deployment: ``flow-name/deployment-name``.
        max_concurrency: at most this many runs unfinished at once; ``submit()``
            waits for a slot. ``None``: no cap.
        poll_interval: seconds between batched reads while the event stream is down.
        tags: tags for every run (besides the submission's own tag).
        job_variables: job variables for every run (a run's own ones win).
        work_queue_name: the work queue for every run (default: the deployment's).
        submission_id: names the submission in keys, tags and logs (default: a new
            uuid). Reusing one after a crash, with the same ``submit()`` calls in
            the same order, finds the runs created before instead of creating more.
        outage_tolerance_s: how long a call keeps retrying while Prefect is
            unreachable before it raises ``TransientGatewayError`` naming the API URL.
        events: when ``wait()`` has every run final, send ``flowsubmit.job.completed``
            (or ``.failed``) for resource ``flowsubmit.job.<submission_id>`` to Prefect's
            event feed, as the daemon does for a job (docs/operations.md).

    Raises:
        ValueError: ``deployment`` is not ``flow-name/deployment-name`` (the daemon's
            message), or an option is out of range.

    Example::

        etl = flow_submitter("process-table-etl/process-table-etl-deployment")
        run_id = await etl.submit(table=1)
        await asyncio.gather(*[etl.submit(table=i) for i in range(2, 21)])
        results = await etl.wait()  # {run_id: "Completed", ...}
    """
    return FlowSubmission(
        deployment,
        max_concurrency=max_concurrency,
        poll_interval=poll_interval,
        tags=tags,
        job_variables=job_variables,
        work_queue_name=work_queue_name,
        submission_id=submission_id,
        outage_tolerance_s=outage_tolerance_s,
        events=events,
    )


def run_batch(
    deployment: str,
    parameter_sets: Iterable[Mapping[str, Any]],
    *,
    max_concurrency: int | None = None,
    timeout: float | None = None,
    show_summary: bool = True,
    tags: Iterable[str] = (),
    job_variables: Mapping[str, Any] | None = None,
    work_queue_name: str | None = None,
    outage_tolerance_s: float = 60.0,
    events: bool = False,
) -> dict[str, str]:
    """Submit one run per parameter set, wait for them all, and return ``{run_id: state name}`` in order.

    The synchronous entry point for plain scripts (it runs its own event loop, so
    call it where no loop runs; in async code use ``flow_submitter``). Failed runs
    are results, not exceptions; the errors are ``flow_submitter``'s and ``wait()``'s.

    Example::

        results = run_batch("etl/etl-deployment", [{"table": t} for t in range(20)])

    Raises:
        RuntimeError: called where an event loop runs (async code, a notebook), before
            anything is created: there, ``flow_submitter`` is the way.
    """
    _refuse_inside_a_running_loop()
    sets = [dict(p) for p in parameter_sets]

    async def submit_and_wait() -> dict[str, str]:
        async with flow_submitter(
            deployment,
            max_concurrency=max_concurrency,
            tags=tags,
            job_variables=job_variables,
            work_queue_name=work_queue_name,
            outage_tolerance_s=outage_tolerance_s,
            events=events,
        ) as runs:
            await asyncio.gather(*(runs.submit_with(p) for p in sets))
            return await runs.wait(timeout=timeout, show_summary=show_summary)

    return asyncio.run(submit_and_wait())


def _ended_event(submission_id: str, runs: RunSet) -> Event:
    """``flowsubmit.job.completed`` when every run completed, else ``.failed``: the daemon's
    job event, the submission in the job's place (no queue, no result file)."""
    summary = runs.summary()
    succeeded = summary.succeeded == summary.total
    return job_event(
        "completed" if succeeded else "failed",
        submission_id,
        labels={"flowsubmit.source": "library"},
        deployments=[(runs.deployment.id, runs.deployment.name)],
        payload={
            "job_id": submission_id,
            "status": "succeeded" if succeeded else "failed",
            "summary": summary.as_dict(),
            "result_path": None,
            "duration_s": None,
            "error": None,
        },
    )


def _refuse_inside_a_running_loop() -> None:
    """``run_batch`` runs its own loop: inside a running one it refuses, saying what to use."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "run_batch() runs its own event loop and cannot be called where one is running"
        " (async code, a notebook): use `async with flow_submitter(deployment) as s:`"
        " with `await s.submit(...)` and `await s.wait()` instead"
    )


@dataclass
class _Engine:
    """One opened gateway and tracker."""

    gateway: Gateway
    tracker: Tracker
    stack: contextlib.AsyncExitStack


class FlowSubmission:
    """Owns the runs submitted to one deployment, their final states, and the engine that watches them.

    Run ids and results are listed in ``submit()`` order; after ``retry_failed()``
    an entry is the latest attempt of its submission. Outcomes are data: a failed
    run is a result, never an exception. See the module docstring for the lifecycle.
    """

    def __init__(
        self,
        deployment: str,
        *,
        max_concurrency: int | None = None,
        poll_interval: float = 5.0,
        tags: Iterable[str] = (),
        job_variables: Mapping[str, Any] | None = None,
        work_queue_name: str | None = None,
        submission_id: str | None = None,
        outage_tolerance_s: float = 60.0,
        events: bool = False,
    ) -> None:
        problem = deployment_name_problem(deployment)
        if problem is not None:
            raise ValueError(problem.message)
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1 (or None for no cap)")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.deployment = deployment
        self.submission_id = submission_id or uuid.uuid4().hex
        self._id_given = submission_id is not None
        self.tag = submission_tag(self.submission_id)
        self.poll_interval = poll_interval
        self.outage_tolerance_s = outage_tolerance_s
        self.max_concurrency = max_concurrency
        self._tags = tuple(tags)
        self._job_variables = dict(job_variables or {})
        self._work_queue_name = work_queue_name
        self._events = events
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._next_index = 0
        self._holding: set[str] = set()
        self._reporter = SubmissionReporter(self.submission_id, deployment)
        #: The first Late run was reported (``submission.runs_late``, once per submission).
        self._late_warned = False
        #: The runs; made when the engine first opens (it needs the resolved deployment).
        self._runs: RunSet | None = None
        self._engine: _Engine | None = None
        self._opening: asyncio.Task[_Engine] | None = None
        self._busy = 0
        self._entered = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<FlowSubmission {self.deployment!r} id={self.submission_id} runs={len(self.run_ids)}"
            f" final={len(self.results)} connected={self.connected}>"
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClosedError("a FlowSubmission cannot be reopened once closed; create a new one")
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the subscription and the client; idempotent. Runs go on in Prefect."""
        self._closed = True
        await self._close_engine()

    @property
    def connected(self) -> bool:
        """True while the submission holds a Prefect client and an event subscription."""
        return self._engine is not None

    # -- results ------------------------------------------------------------------------

    @property
    def run_ids(self) -> list[str]:
        """Flow run ids in ``submit()`` order (the latest attempt of each)."""
        return self._runs.latest() if self._runs else []

    @property
    def results(self) -> dict[str, str]:
        """Run id -> final state name, for the runs of ``run_ids`` that are final."""
        return {r: snap.state_name for r, snap in self._finals()}

    def succeeded(self) -> list[str]:
        """Run ids whose final state type is COMPLETED (whatever the state's name)."""
        return [r for r, snap in self._finals() if snap.succeeded]

    def failed(self) -> list[str]:
        """Run ids that are final and did not complete (Failed, Crashed, Cancelled, TimedOut...)."""
        return [r for r, snap in self._finals() if not snap.succeeded]

    def snapshot(self, run_id: str) -> RunSnapshot | None:
        """The final snapshot of a run of this submission (name, state type, times), if final."""
        return self._runs.snapshot(run_id) if self._runs else None

    def _finals(self) -> list[tuple[str, RunSnapshot]]:
        return [(r, snap) for r in self.run_ids if (snap := self.snapshot(r)) is not None]

    # -- submitting -----------------------------------------------------------------------

    async def submit(self, /, **parameters: Any) -> str:
        """Create one run scheduled to start now; return its flow run id.

        Every keyword is a flow parameter (none is reserved); per-run tags, name and
        job variables go through ``submit_with``. Safe under ``asyncio.gather``;
        with ``max_concurrency`` it first waits for a free slot.

        Raises:
            PermanentGatewayError: unknown deployment, or parameters the flow refuses.
            AuthenticationError: Prefect refuses the credentials (at once on the first
                call; later refusals are waited out within ``outage_tolerance_s``).
            ClosedError: the submission was closed.
        """
        return await self.submit_with(parameters)

    async def submit_with(
        self,
        parameters: Mapping[str, Any],
        *,
        tags: Iterable[str] = (),
        flow_run_name: str | None = None,
        job_variables: Mapping[str, Any] | None = None,
    ) -> str:
        """``submit()`` with per-run options; parameters come as a mapping so no name can clash."""
        self._check_open()
        index, self._next_index = self._next_index, self._next_index + 1
        record = RunRecord(
            0,
            index,
            self.deployment,
            dict(parameters),
            tags=(*self._tags, *tags),
            job_variables={**self._job_variables, **(job_variables or {})},
            name=flow_run_name,
        )
        return await self._create(record)

    async def retry_failed(self) -> list[str]:
        """Submit again, with new idempotency keys, every run that is final and did not complete.

        Returns:
            The new run ids, which replace the failed ones in ``run_ids`` and ``results``.
        """
        failed = set(self.failed())
        runs = [r for r in self._runs.ordered() if r.run_ids[-1] in failed] if self._runs else []
        return list(await asyncio.gather(*(self._create(record) for record in runs)))

    async def _create(self, record: RunRecord) -> str:
        async with self._using() as engine:
            runs = self._run_set()
            if not record.run_ids:
                problem = runs.check(record, self.deployment)
                if problem is not None:
                    raise PermanentGatewayError(
                        problem.reason, operation="validate_parameters", deployment=self.deployment
                    )
            async with self._slot(engine):
                run_id = await runs.create(record)
                self._holding.add(run_id)
            runs.add(record)
            return run_id

    def _freed(self, record: RunRecord, snap: RunSnapshot) -> None:
        """A run is final: its concurrency slot is free."""
        if snap.flow_run_id in self._holding and self._slots is not None:
            self._holding.discard(snap.flow_run_id)
            self._slots.release()

    def _state_changed(self, record: RunRecord, run_id: str, code: int) -> None:
        """The run-set's ``on_state``: warn of the submission's first Late run."""
        if code != LATE or self._late_warned or self._runs is None:
            return
        self._late_warned = True
        self._reporter.runs_late(record, run_id, *self._runs.waits_in())

    @contextlib.asynccontextmanager
    async def _slot(self, engine: _Engine) -> AsyncIterator[None]:
        """Hold a concurrency slot; on success the created run keeps it until it is final."""
        if self._slots is None:
            yield
            return
        if self._slots.locked():
            # A run found by its key may be final already, with no event to come.
            engine.tracker.reconcile_soon()
        await self._slots.acquire()
        try:
            yield
        except BaseException:
            self._slots.release()
            raise

    # -- waiting ------------------------------------------------------------------------

    async def wait(
        self,
        poll_interval: float | None = None,
        show_summary: bool = True,
        # The API: the exception carries the partial results, which a caller's
        # own `asyncio.timeout` could not give.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> dict[str, str]:
        """Wait until every submitted run is final; return ``results`` for all of them.

        Call it again after more ``submit()`` calls to wait for those too. In plain
        use (no ``async with``) it closes the engine when it returns or raises.

        Args:
            poll_interval: seconds between batched reads while the event stream is
                down (default: the submitter's ``poll_interval``).
            show_summary: log ``submission.summary`` (``Summary → 18/20 succeeded, 2 failed``).
            timeout: seconds to wait at most; ``None`` waits for as long as it takes.

        Raises:
            WaitTimeout: with ``results`` (the runs that are final) and ``pending``.
        """
        self._check_open()
        if poll_interval is not None:
            self.poll_interval = poll_interval
            if self._engine is not None:
                self._engine.tracker.poll_interval_s = poll_interval
        try:
            async with asyncio.timeout(timeout):
                await self._wait_all_within_tolerance()
        except TimeoutError:
            pending = self._unfinished()
            raise WaitTimeout(
                f"{len(pending)} of {len(self.run_ids)} runs of {self.deployment!r}"
                f" not final after {timeout} s",
                results=self.results,
                pending=pending,
            ) from None
        finally:
            if not self._entered and self._busy == 0:
                await self._close_engine()
        if show_summary and self._runs is not None:
            self._reporter.summary(self._runs.summary())
        if self._events and self._runs is not None:
            await emit_job_event(_ended_event(self.submission_id, self._runs))
        return self.results

    async def wait_for(self, run_id: str) -> str:
        """Wait for one run of this submission (the others go on); return its final state name.

        Bound it with ``asyncio.timeout(...)``; the run goes on in Prefect either way.

        Raises:
            KeyError: ``run_id`` is not a run of this submission.
        """
        if self._runs is None or self._runs.owner(run_id) is None:
            raise KeyError(f"{run_id} is not a run of this submission")
        while (snap := self._runs.snapshot(run_id)) is None:
            async with self._using():
                await self._runs.wait([run_id])
        return snap.state_name

    async def _wait_all_within_tolerance(self) -> None:
        """``_wait_all``, given up once every read has failed for ``outage_tolerance_s``:
        a script is told Prefect is gone, as its calls are, instead of waiting forever."""
        waiter = asyncio.ensure_future(self._wait_all())
        loop = asyncio.get_running_loop()
        try:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=OUTAGE_CHECK_S)
                tracker = self._engine.tracker if self._engine is not None else None
                if tracker is None or tracker.failing_since is None or tracker.last_error is None:
                    continue
                if loop.time() - tracker.failing_since > self.outage_tolerance_s:
                    raise _unreachable(tracker.last_error, self.outage_tolerance_s)
            waiter.result()
        finally:
            if not waiter.done():
                waiter.cancel()
                await asyncio.wait([waiter])

    async def _wait_all(self) -> None:
        # No read of its own: the tracker reads, batched, any run it watches without an
        # event to cover it (a run found again by its key may be final already).
        while unfinished := self._unfinished():
            async with self._using():
                await self._run_set().wait(unfinished)

    # -- cancelling ---------------------------------------------------------------------

    async def cancel(self, grace_s: float = CANCEL_GRACE_S) -> list[str]:
        """Ask Prefect to cancel every run not final yet, and give them ``grace_s`` to end.

        Runs which ended a moment ago are recorded as they ended; a cancel Prefect
        refuses is logged (warning) and the other runs are cancelled all the same.
        ``wait()`` collects whatever has not ended by then.

        Returns:
            The run ids cancellation was asked for.
        """
        if not self._unfinished():
            return []
        async with self._using():
            return await self._run_set().cancel_unfinished(
                grace_s, f"cancelled by flowsubmit: submission {self.submission_id} called cancel()"
            )

    # -- engine ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[_Engine]:
        """The open engine for one call; in plain use, closed after the last call if nothing is unfinished."""
        self._check_open()
        self._busy += 1
        try:
            yield await self._open()
        except AuthenticationError:
            raise  # refused credentials are said at once, not as an outage
        except TransientGatewayError as exc:
            raise _unreachable(exc, self.outage_tolerance_s) from exc
        finally:
            self._busy -= 1
            if not self._entered and self._busy == 0 and not self._unfinished():
                await self._close_engine()

    async def _open(self) -> _Engine:
        """The engine, opening it if needed. Concurrent callers share one opening task, so
        that gathered submits resume in the same tick and their creates go out in one bulk call."""
        while self._engine is None:
            if self._opening is None:
                self._opening = asyncio.create_task(
                    self._open_engine(), name=f"flowsubmit-submission-open-{self.submission_id}"
                )
                self._opening.add_done_callback(self._opened)
            await asyncio.shield(self._opening)
        return self._engine

    def _opened(self, task: asyncio.Task[_Engine]) -> None:
        # Runs before the callers' shields resolve (registered first), and retrieves the
        # exception even when every caller was cancelled meanwhile.
        self._opening = None
        if not task.cancelled() and task.exception() is None:
            self._engine = task.result()

    async def _open_engine(self) -> _Engine:
        """Gateway, deployment, then the subscription; every unfinished run is watched again."""
        stack = contextlib.AsyncExitStack()
        try:
            gateway = await stack.enter_async_context(
                Gateway(outage_tolerance_s=self.outage_tolerance_s)
            )
            await _refuse_wrong_server(gateway)
            if self._runs is None:
                deployment = await gateway.resolve_deployment(self.deployment)
                self._runs = RunSet(
                    deployment,
                    key=lambda deployment_id, index, attempt: submission_key(
                        deployment_id, self.submission_id, index, attempt
                    ),
                    tags=(self.tag,),
                    reporter=self._reporter,
                    work_queue_name=self._work_queue_name,
                    lane=self.submission_id,
                    on_final=self._freed,
                    on_state=self._state_changed,
                    # An id given again after a crash finds the runs made before by their keys.
                    new_keys=not self._id_given,
                )
            tracker = await stack.enter_async_context(
                Tracker(gateway, tag=self.tag, poll_interval_s=self.poll_interval)
            )
            await tracker.wait_connected(CONNECT_TIMEOUT_S)
        except BaseException:
            await stack.aclose()
            raise
        self._runs.attach(gateway, tracker)
        return _Engine(gateway, tracker, stack)

    async def _close_engine(self) -> None:
        opening = self._opening
        if opening is not None:  # close what is being opened, too
            with contextlib.suppress(Exception):
                await asyncio.shield(opening)
        engine, self._engine = self._engine, None
        if engine is not None:
            if self._runs is not None:
                self._runs.detach()
            await engine.stack.aclose()  # the tracker first, then the client it uses

    # -- helpers --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this FlowSubmission is closed; create a new one")

    def _run_set(self) -> RunSet:
        if self._runs is None:  # pragma: no cover - made when the engine opens
            raise AssertionError("the run-set is made when the engine opens")
        return self._runs

    def _unfinished(self) -> list[str]:
        return self._runs.unfinished() if self._runs else []


async def _refuse_wrong_server(gateway: Gateway) -> None:
    """Raise at once when Prefect refuses the credentials (``AuthenticationError``) or is no
    Prefect 3 server (``IncompatibleServer``); read its version (``Gateway.know_server``).

    Only a refusal: Prefect not answering is left to the calls that follow, which wait
    for it within ``outage_tolerance_s`` (as they would for refused credentials later on).
    These two calls are not retried, and get ``ATTEMPT_FLOOR_S`` between them: a
    silent host must not delay the calls that count the tolerance.
    """
    try:
        async with asyncio.timeout(ATTEMPT_FLOOR_S):
            await gateway.know_server()
            await gateway.check_credentials()
    except (AuthenticationError, IncompatibleServer):
        raise
    except (GatewayError, TimeoutError):
        pass


def _unreachable(exc: GatewayError, tolerance_s: float) -> TransientGatewayError:
    """The one error a script sees when Prefect does not answer: which API, for how long."""
    from flowsubmit.gateway.connection import configured_api_url, display_url

    url = display_url(configured_api_url())
    return TransientGatewayError(
        f"Prefect API at {url} unreachable for {tolerance_s:g} s (outage_tolerance_s): {exc}",
        operation=exc.operation,
        deployment=exc.deployment,
    )
