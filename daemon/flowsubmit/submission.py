"""The library API: ``flow_submitter(...)`` fans runs of one deployment out, ``wait()`` fans their final states in.

Lifecycle (issue 4). A submission owns at most one *engine* at a time: a
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
import functools
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import structlog

from flowsubmit._types import Deployment, RunRequest, RunSnapshot
from flowsubmit.errors import (
    AuthenticationError,
    ClosedError,
    GatewayError,
    PermanentGatewayError,
    WaitTimeout,
)
from flowsubmit.gateway import Gateway, parameter_problem
from flowsubmit.results import finished_message, summary_counts, summary_line
from flowsubmit.tracker import Tracker

__all__ = ["FlowSubmission", "flow_submitter", "submission_key", "submission_tag"]

log = structlog.get_logger("flowsubmit.submission")

#: How long opening an engine waits for the event subscription before creating runs
#: anyway (if the stream is late, the tracker's reconciliation reads catch up).
CONNECT_TIMEOUT_S = 10.0


def submission_tag(submission_id: str) -> str:
    """The tag on every run of one submission: its tracker subscribes to exactly these runs."""
    return f"flowsubmit-submission:{submission_id}"


def submission_key(deployment_id: str, submission_id: str, index: int, attempt: int) -> str:
    """The idempotency key of one creation (Prefect scopes keys per flow, hence the deployment id)."""
    return f"flowsubmit-lib/{deployment_id}/{submission_id}/{index}/{attempt}"


def flow_submitter(
    deployment: str,
    *,
    max_concurrency: int | None = None,
    poll_interval: float = 5.0,
    tags: Iterable[str] = (),
    job_variables: Mapping[str, Any] | None = None,
    work_queue_name: str | None = None,
    submission_id: str | None = None,
    outage_tolerance_s: float = 3600.0,
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
            unreachable before it raises ``TransientGatewayError``.

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
    )


@dataclass
class _Item:
    """One ``submit()``: what to create, and the run of every attempt (``retry_failed`` adds one)."""

    index: int
    parameters: dict[str, Any]
    tags: tuple[str, ...]
    job_variables: dict[str, Any]
    flow_run_name: str | None
    run_ids: list[str] = field(default_factory=list)


@dataclass
class _Engine:
    """One opened gateway and tracker, and the tracker futures of the runs watched through them."""

    gateway: Gateway
    tracker: Tracker
    stack: contextlib.AsyncExitStack
    futures: dict[str, asyncio.Future[RunSnapshot]] = field(default_factory=dict)


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
        outage_tolerance_s: float = 3600.0,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1 (or None for no cap)")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.deployment = deployment
        self.submission_id = submission_id or uuid.uuid4().hex
        self.tag = submission_tag(self.submission_id)
        self.poll_interval = poll_interval
        self.outage_tolerance_s = outage_tolerance_s
        self.max_concurrency = max_concurrency
        self._tags = tuple(tags)
        self._job_variables = dict(job_variables or {})
        self._work_queue_name = work_queue_name
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._items: dict[int, _Item] = {}
        self._next_index = 0
        self._owner: dict[str, tuple[_Item, int]] = {}
        self._finals: dict[str, RunSnapshot] = {}
        self._holding: set[str] = set()
        self._resolved: Deployment | None = None
        self._engine: _Engine | None = None
        self._opening: asyncio.Task[_Engine] | None = None
        self._busy = 0
        self._entered = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<FlowSubmission {self.deployment!r} id={self.submission_id} runs={len(self._items)}"
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
        return [item.run_ids[-1] for item in self._ordered()]

    @property
    def results(self) -> dict[str, str]:
        """Run id -> final state name, for the runs of ``run_ids`` that are final."""
        return {
            run_id: self._finals[run_id].state_name
            for run_id in self.run_ids
            if run_id in self._finals
        }

    def succeeded(self) -> list[str]:
        """Run ids whose final state type is COMPLETED (whatever the state's name)."""
        return [r for r in self.run_ids if r in self._finals and self._finals[r].succeeded]

    def failed(self) -> list[str]:
        """Run ids that are final and did not complete (Failed, Crashed, Cancelled, TimedOut...)."""
        return [r for r in self.run_ids if r in self._finals and not self._finals[r].succeeded]

    def snapshot(self, run_id: str) -> RunSnapshot | None:
        """The final snapshot of a run of this submission (name, state type, times), if final."""
        return self._finals.get(run_id)

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
        item = _Item(
            index=index,
            parameters=dict(parameters),
            tags=tuple(tags),
            job_variables={**self._job_variables, **(job_variables or {})},
            flow_run_name=flow_run_name,
        )
        return await self._create(item)

    async def retry_failed(self) -> list[str]:
        """Submit again, with new idempotency keys, every run that is final and did not complete.

        Returns:
            The new run ids, which replace the failed ones in ``run_ids`` and ``results``.
        """
        failed = set(self.failed())
        items = [item for item in self._ordered() if item.run_ids[-1] in failed]
        return list(await asyncio.gather(*(self._create(item) for item in items)))

    async def _create(self, item: _Item) -> str:
        async with self._using() as engine:
            deployment = self._deployment()
            attempt = len(item.run_ids)
            if attempt == 0:
                _check_parameters(deployment, item.parameters)
            request = RunRequest(
                idempotency_key=submission_key(
                    deployment.id, self.submission_id, item.index, attempt
                ),
                parameters=item.parameters,
                tags=tuple(dict.fromkeys([self.tag, *self._tags, *item.tags])),
                job_variables=item.job_variables,
                work_queue_name=self._work_queue_name,
                name=item.flow_run_name,
                lane=self.submission_id,
            )
            async with self._slot(engine):
                run_id = await engine.gateway.create_run(deployment, request)
                self._holding.add(run_id)
            self._add_run(item, run_id, engine)
            return run_id

    def _add_run(self, item: _Item, run_id: str, engine: _Engine) -> None:
        if item.run_ids:
            previous = item.run_ids[-1]
            log.info(
                "submission.retrying",
                submission_id=self.submission_id,
                deployment=self.deployment,
                index=item.index,
                attempt=len(item.run_ids) + 1,
                flow_run_id=run_id,
                previous_flow_run_id=previous,
                state=self._finals[previous].state_name,
            )
        item.run_ids.append(run_id)
        self._items.setdefault(item.index, item)
        self._owner[run_id] = (item, len(item.run_ids) - 1)
        self._watch(engine, run_id)

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
                await self._wait_all()
        except TimeoutError:
            pending = self._unfinished()
            raise WaitTimeout(
                f"{len(pending)} of {len(self._items)} runs of {self.deployment!r}"
                f" not final after {timeout} s",
                results=self.results,
                pending=pending,
            ) from None
        finally:
            if not self._entered and self._busy == 0:
                await self._close_engine()
        if show_summary:
            self._log_summary()
        return self.results

    async def wait_for(self, run_id: str) -> str:
        """Wait for one run of this submission (the others go on); return its final state name.

        Bound it with ``asyncio.timeout(...)``; the run goes on in Prefect either way.

        Raises:
            KeyError: ``run_id`` is not a run of this submission.
        """
        if run_id not in self._owner:
            raise KeyError(f"{run_id} is not a run of this submission")
        while run_id not in self._finals:
            async with self._using() as engine:
                await self._await_final(engine, [run_id])
        return self._finals[run_id].state_name

    async def _wait_all(self) -> None:
        # No read of its own: the tracker reads, batched, any run it watches without an
        # event to cover it (a run found again by its key may be final already; issue 3).
        while unfinished := self._unfinished():
            async with self._using() as engine:
                await self._await_final(engine, unfinished)

    async def _await_final(self, engine: _Engine, run_ids: list[str]) -> None:
        await asyncio.wait([engine.futures[r] for r in run_ids])
        for run_id in run_ids:
            self._settle(run_id, engine.futures[run_id])

    # -- cancelling ---------------------------------------------------------------------

    async def cancel(self) -> list[str]:
        """Ask Prefect to cancel every run not final yet; ``wait()`` then collects their final states.

        One batched read first, so that runs which ended a moment ago are recorded as
        they ended (Prefect would refuse to cancel them anyway) and not asked again.

        Returns:
            The run ids cancellation was asked for.
        """
        if not self._unfinished():
            return []
        async with self._using() as engine:
            unfinished = self._unfinished()
            current = {s.flow_run_id: s for s in await engine.gateway.read_runs(unfinished)}
            for snap in current.values():
                engine.tracker.observe(snap)
            to_cancel = [r for r in unfinished if r not in current or not current[r].final]
            for run_id in to_cancel:
                await engine.gateway.cancel_run(run_id)
                log.info(
                    "submission.run_cancelled",
                    submission_id=self.submission_id,
                    deployment=self.deployment,
                    index=self._owner[run_id][0].index,
                    flow_run_id=run_id,
                )
        return to_cancel

    # -- engine ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[_Engine]:
        """The open engine for one call; in plain use, closed after the last call if nothing is unfinished."""
        self._check_open()
        self._busy += 1
        try:
            yield await self._open()
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
            await _refuse_wrong_credentials(gateway)
            if self._resolved is None:
                self._resolved = await gateway.resolve_deployment(self.deployment)
            tracker = await stack.enter_async_context(
                Tracker(gateway, tag=self.tag, poll_interval_s=self.poll_interval)
            )
            await tracker.wait_connected(CONNECT_TIMEOUT_S)
        except BaseException:
            await stack.aclose()
            raise
        engine = _Engine(gateway, tracker, stack)
        unfinished = self._unfinished()
        for run_id in unfinished:
            self._watch(engine, run_id)
        if unfinished:
            tracker.reconcile_soon()  # they may have ended while nothing was subscribed
        return engine

    async def _close_engine(self) -> None:
        opening = self._opening
        if opening is not None:  # close what is being opened, too
            with contextlib.suppress(Exception):
                await asyncio.shield(opening)
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stack.aclose()  # the tracker first, then the client it uses

    def _watch(self, engine: _Engine, run_id: str) -> None:
        if run_id in engine.futures:
            return
        future = engine.futures[run_id] = engine.tracker.watch(run_id)
        future.add_done_callback(functools.partial(self._settle, run_id))

    def _settle(self, run_id: str, future: asyncio.Future[RunSnapshot]) -> None:
        """Record a run's final snapshot once: free its slot, log its line."""
        if not future.done() or future.cancelled() or future.exception() is not None:
            return  # the tracker was closed; a later engine watches the run again
        snap = future.result()
        if run_id in self._finals:
            return
        self._finals[run_id] = snap
        if run_id in self._holding and self._slots is not None:
            self._holding.discard(run_id)
            self._slots.release()
        item, attempt = self._owner[run_id]
        log.info(
            "submission.run_finished",
            submission_id=self.submission_id,
            deployment=self.deployment,
            index=item.index,
            attempt=attempt + 1,
            flow_run_id=run_id,
            flow_run_name=snap.flow_run_name,
            state=snap.state_name,
            state_type=snap.state_type,
            source=snap.source,
            message=finished_message(self.deployment, snap),
        )

    # -- helpers --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this FlowSubmission is closed; create a new one")

    def _deployment(self) -> Deployment:
        if self._resolved is None:  # pragma: no cover - resolved when the engine opens
            raise AssertionError("the deployment is resolved when the engine opens")
        return self._resolved

    def _ordered(self) -> list[_Item]:
        return [self._items[i] for i in sorted(self._items)]

    def _unfinished(self) -> list[str]:
        return [r for r in self.run_ids if r not in self._finals]

    def _log_summary(self) -> None:
        counts = summary_counts(
            (self._finals[r].state_type, self._finals[r].state_name) for r in self.run_ids
        )
        log.info(
            "submission.summary",
            submission_id=self.submission_id,
            deployment=self.deployment,
            total=counts["total"],
            succeeded=counts["succeeded"],
            failed=counts["failed"],
            by_state=counts["by_state"],
            message=summary_line(counts["succeeded"], counts["total"]),
        )


def _check_parameters(deployment: Deployment, parameters: dict[str, Any]) -> None:
    """Refuse what Prefect would accept and then crash on (unknown names) or refuse (types)."""
    problem = parameter_problem(deployment, parameters)
    if problem is not None:
        raise PermanentGatewayError(
            f"{deployment.name}: {problem[0]}",
            operation="validate_parameters",
            deployment=deployment.name,
        )


async def _refuse_wrong_credentials(gateway: Gateway) -> None:
    """Raise ``AuthenticationError`` at once when Prefect refuses the credentials.

    Only a refusal: Prefect not answering is left to the calls that follow, which wait
    for it within ``outage_tolerance_s`` (as they would for refused credentials later on).
    """
    try:
        await gateway.check_credentials()
    except AuthenticationError:
        raise
    except GatewayError:
        pass
