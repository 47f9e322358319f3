"""``Gateway``, the one client of Prefect's API: every call, made under the retry policy and error
translation of ``translate``, with what it sends and reads converted by ``convert``.

Retry budget, stated once. Prefect's own HTTP client already retries a request up
to ``PREFECT_CLIENT_MAX_RETRIES`` (5) times on 408/429/502/503 and transport errors,
honouring ``Retry-After``, with 2**n s backoff (about 62 s in the worst case). The
tenacity policy here goes around whole idempotent operations, with exponential
backoff and jitter (0.5 s doubling to 30 s, never shorter than a ``Retry-After``),
and stops once ``prefect_outage_tolerance_s`` has passed; no backoff sleeps past
it, and an attempt of a read or cancel is cut at it (``Retrying``, at least
``ATTEMPT_FLOOR_S`` per attempt), so such an operation ends within the tolerance
plus that floor whatever Prefect's and httpx's own retries and timeouts would take.
A create's attempt is not cut (it may wait for a call slot or a rate limit): its
worst case is the tolerance plus one inner round of Prefect's retries. Creates are
idempotent because every run carries an idempotency key. Items of a bulk create
that the server refused for contention ("database is locked") are sent again at
once while each call still creates something; backoff starts only when a call
creates nothing, and then briefly (0.1 s doubling to 2 s) when the server only
contended (``ContentionError``).

Rate limits (429) are retried by Prefect's client, as above; the gateway sees every
response (a response hook, Prefect's own retries included) and, on a 429, its
``Pacer`` holds back every create call until ``Retry-After`` has passed and spaces
create calls out, then speeds up as they are accepted (``gateway.throttled`` /
``gateway.unthrottled``). Up to ``max_inflight_submissions`` create calls are out at
once, one while the server refuses items for database contention (``CallLimit``: two
calls against a SQLite-backed server collide and create fewer runs than one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Self
from urllib.parse import quote

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse, OrchestrationResult
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.states import Cancelling

from flowsubmit import metrics
from flowsubmit._types import FINAL_STATE_TYPES, Deployment, RunRequest, RunSnapshot
from flowsubmit.errors import (
    ClosedError,
    ContentionError,
    GatewayError,
    PermanentGatewayError,
    TransientGatewayError,
)
from flowsubmit.gateway.connection import configured_api_url, display_url
from flowsubmit.gateway.convert import (
    bulk_item,
    create_bodies,
    create_fields,
    finished_filter,
    plain,
    snapshot_from_event,
    snapshot_from_run,
)
from flowsubmit.gateway.diagnosis import health_problem
from flowsubmit.gateway.older_clients import FlowRunFilter, complete_models
from flowsubmit.gateway.pacer import CallLimit, CallSize, Pacer
from flowsubmit.gateway.scheduler import CreateScheduler
from flowsubmit.gateway.server import CLIENT_RULE, Server, read_server
from flowsubmit.gateway.translate import Retrying, retry_after, translate_errors
from flowsubmit.logs import get_logger

__all__ = ["READ_BATCH", "Gateway"]

log = get_logger("flowsubmit.gateway")

#: Runs read per ``read_flow_runs`` call (the server's default page size).
READ_BATCH = 200
#: How long closing the event stream may wait for the server's answer.
STREAM_CLOSE_S = 0.25
_BULK_PATH = "/deployments/{id}/create_flow_run/bulk"


def _quiet_httpx() -> None:
    """Keep httpx's one INFO line per request out of a script's ``basicConfig(level=INFO)``.

    Only while nobody has set the ``httpx`` logger's level: a level the user chose wins.
    """
    httpx_log = logging.getLogger("httpx")
    if httpx_log.level == logging.NOTSET:
        httpx_log.setLevel(logging.WARNING)


class Gateway:
    """Owns one Prefect client, the create scheduler, the retry policy and request counters.

    Lifecycle: ``async with Gateway(...)`` opens the client; ``aclose()`` is idempotent,
    and a closed gateway refuses further use.
    """

    def __init__(
        self,
        *,
        outage_tolerance_s: float = 3600.0,
        max_inflight_submissions: int = 2,
        submit_batch_size: int = 100,
        reconnection_attempts: int = 2,
    ) -> None:
        self.outage_tolerance_s = outage_tolerance_s
        self.reconnection_attempts = reconnection_attempts
        #: Requests sent to the Prefect API, by route (for tests, bench and metrics).
        self.requests: Counter[str] = Counter()
        #: How many create calls may be out at once (fewer while the database contends).
        self.calls = CallLimit(max_inflight_submissions)
        #: How many runs one create call carries (fewer while the server creates slowly).
        self.call_size = CallSize(submit_batch_size)
        #: The Prefect API this gateway talks to (set on entry).
        self.api_url: str | None = None
        #: Spaces out create calls while the API answers 429 (rate limits).
        self.pacer = Pacer()
        self._client: PrefectClient | None = None
        self._closed = False
        #: The server, as its version says (``know_server``); None until first read.
        self.server: Server | None = None
        self._knowing = asyncio.Lock()
        self._bulk = True
        self._bulk_missing = False  # the bulk route answered 404/405 (a proxy may not pass it)
        #: Orders the pending creates of every job into batches (fair between jobs, by priority).
        self._scheduler = CreateScheduler(
            self._create_batch,
            capacity=lambda: self.calls.limit,
            # Under a rate limit requests are what counts: full calls, however slow.
            batch_size=lambda: (
                self.call_size.maximum if self.pacer.throttled else self.call_size.size
            ),
            sent=self._create_sent,
        )
        #: Set (and replaced) each time a create request has been written to the server.
        self._written = asyncio.Event()

    async def __aenter__(self) -> Self:
        if self._closed:
            raise ClosedError("a Gateway cannot be reopened once closed; create a new one")
        hooks = {"request": [self._count], "response": [self._observe]}
        self.api_url = configured_api_url()  # never let get_client() start a temporary server
        complete_models()
        _quiet_httpx()
        self._client = get_client(httpx_settings={"event_hooks": hooks})
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client; idempotent."""
        self._closed = True
        self._scheduler.close()
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    async def _count(self, request: httpx.Request) -> None:
        self.requests[_route(request)] += 1
        if request.url.path.endswith("/create_flow_run"):
            self._signal_written()  # a single create: about to be written (no trace hook there)

    async def _observe(self, response: httpx.Response) -> None:
        """Every response, Prefect's own retries included: 429s throttle creates, accepted creates lift it."""
        if response.status_code == 429:
            self.pacer.refused(retry_after(response), _route(response.request))
        elif response.is_success and "create_flow_run" in response.request.url.path:
            self.pacer.accepted()

    @property
    def client(self) -> PrefectClient:
        """The open client; raises ``ClosedError`` outside ``async with``."""
        if self._client is None:
            raise ClosedError("the Gateway is not open (use `async with Gateway()`)")
        return self._client

    def _retrying(self, operation: str, deployment: str | None = None) -> Retrying:
        """The one retry policy: transient errors only, backoff with jitter, bounded by the outage tolerance."""
        return Retrying(self.outage_tolerance_s)

    # -- operations --------------------------------------------------------------------

    async def healthy(self) -> bool:
        """One health check, no retries: True when the API answers."""
        return await self.health_error() is None

    async def health_error(self) -> str | None:
        """One health check, no retries: None when the API answers, else what went wrong."""
        error = await self.client.api_healthcheck()
        return None if error is None else health_problem(error)

    async def server_version(self) -> str:
        """The Prefect server's version (one call, no retries)."""
        with translate_errors("read server version"):
            return str(await self.client.api_version())

    async def know_server(self) -> Server:
        """Read the server's version and decide what to ask of it (``gateway.server``): at
        start and after every reconnect. One call, no retries.

        Raises:
            IncompatibleServer: not a Prefect 3 server.
            TransientGatewayError: Prefect did not answer.
        """
        with translate_errors("read server version"):
            server = await read_server(self.client, display_url(self.api_url or ""))
        if server != self.server:
            client_version = self.client.client_version()
            log.info(
                "gateway.server",
                server_version=server.version,
                client_version=client_version,
                bulk=server.bulk,
            )
            if server.client_newer:
                log.warning(
                    "gateway.server_older",
                    server_version=server.version,
                    client_version=client_version,
                    rule=CLIENT_RULE,
                )
        self.server = server
        self._bulk = server.bulk and not self._bulk_missing
        return server

    async def _known_server(self) -> Server:
        """The server, read once before the first create when nobody has read it yet."""
        async with self._knowing:
            if self.server is None:
                return await self.know_server()
            return self.server

    async def check_credentials(self) -> None:
        """One cheap authenticated read, no retries (Prefect's health route needs no credentials).

        Raises:
            AuthenticationError: Prefect refused the credentials (401/403).
            TransientGatewayError: Prefect did not answer.
        """
        with translate_errors("check credentials"):
            await self.client.read_deployments(limit=1)

    async def resolve_deployment(self, name: str) -> Deployment:
        """Return the deployment ``flow/deployment``; unknown names are a permanent error."""
        flow_name, _, deployment_name = name.partition("/")
        async for attempt in (retrying := self._retrying("read_deployment", name)):
            with (
                attempt,
                translate_errors(
                    f"read deployment {name!r}",
                    name,
                    not_found=f"deployment {name!r} not found or unreadable",
                ),
            ):
                async with retrying.bound():
                    # Prefect's read_deployment_by_name puts the names into the path as they
                    # are, so a '#' or '?' would cut the path and read another deployment.
                    reply = await self.client.request(
                        "GET",
                        "/deployments/name/{flow_name}/{deployment_name}",
                        path_params={
                            "flow_name": quote(flow_name, safe=""),
                            "deployment_name": quote(deployment_name, safe=""),
                        },
                    )
        response = DeploymentResponse.model_validate(reply.json())
        return Deployment(
            id=str(response.id),
            name=name,
            parameter_schema=dict(response.parameter_openapi_schema or {}),
            default_parameters=dict(response.parameters or {}),
            work_pool_name=response.work_pool_name,
            work_queue_name=response.work_queue_name,
            status=response.status.value if response.status else None,
        )

    async def check_work_queue(self, deployment: Deployment, work_queue_name: str) -> None:
        """Raise ``PermanentGatewayError`` unless the queue exists in the deployment's work pool."""
        if deployment.work_pool_name is None:
            raise PermanentGatewayError(
                f"deployment {deployment.name!r} has no work pool, so `work_queue_name` cannot apply",
                operation="read_work_queue",
            )
        async for attempt in (retrying := self._retrying("read_work_queue", deployment.name)):
            with (
                attempt,
                translate_errors(
                    f"work queue {work_queue_name!r} does not exist in pool {deployment.work_pool_name!r}"
                ),
            ):
                async with retrying.bound():
                    await self.client.read_work_queue_by_name(
                        work_queue_name, work_pool_name=deployment.work_pool_name
                    )

    async def create_run(self, deployment: Deployment, request: RunRequest) -> str:
        """Create (or find, by idempotency key) one run; concurrent calls are sent in bulk.

        The run waits its turn in ``request.lane`` (its job) at ``request.priority``:
        the scheduler shares the calls in flight fairly between jobs (``gateway.scheduler``).
        """
        return await self._scheduler.create(deployment, request)

    async def _create_batch(
        self, deployment: Deployment, requests: list[RunRequest]
    ) -> list[str | Exception]:
        """Create a batch, retrying only the items that failed transiently (keys make it safe).

        The scheduler counts the batch as one call out until this returns: its calls go
        one after another, and a backoff holds its place (the next call would most
        likely fail the same way).
        """
        done: dict[int, str | Exception] = {}
        async for attempt in self._retrying("create_flow_runs", deployment.name):
            with attempt, translate_errors("create flow runs", deployment.name):
                while len(done) < len(requests):
                    todo = [i for i in range(len(requests)) if i not in done]
                    started, refusals = time.monotonic(), self.pacer.refusals
                    try:
                        async with self.calls.slot():
                            outcome = await self._create_some(
                                deployment, [requests[i] for i in todo]
                            )
                    finally:
                        took_s = time.monotonic() - started
                        metrics.SUBMIT_SECONDS.observe(took_s)
                    if self.pacer.refusals == refusals:  # a 429's wait tells nothing of the server
                        self.call_size.observe(took_s, sum(isinstance(r, str) for r in outcome))
                    if any(isinstance(r, ContentionError) for r in outcome):
                        self.calls.contended()
                    else:
                        self.calls.clean()
                    settled = {
                        i: r
                        for i, r in zip(todo, outcome, strict=True)
                        if not isinstance(r, TransientGatewayError)
                    }
                    done.update(settled)
                    transient = [r for r in outcome if isinstance(r, TransientGatewayError)]
                    if transient and not settled:
                        raise transient[0]  # nothing went through: back off
                    # Else some items met contention in a call that worked: send them again now.
        return [done[i] for i in range(len(requests))]

    async def _create_some(
        self, deployment: Deployment, requests: list[RunRequest]
    ) -> list[str | Exception]:
        await self._known_server()
        if self._bulk:
            try:
                return await self._bulk_create(deployment, requests)
            except httpx.HTTPStatusError as exc:
                if not _bulk_route_missing(exc.response):
                    raise
                if self._bulk:  # calls in flight together may all learn it: log it once
                    self._bulk, self._bulk_missing = False, True
                    log.warning(
                        "gateway.bulk_unavailable",
                        status=exc.response.status_code,
                        url=str(exc.request.url),
                    )
        return await self._create_singly(deployment, requests)

    async def _create_singly(
        self, deployment: Deployment, requests: list[RunRequest]
    ) -> list[str | Exception]:
        """One call per run, in order; after a transient failure the rest wait for the batch's retry."""
        results: list[str | Exception] = []
        for index, request in enumerate(requests):
            try:
                with translate_errors("create flow run", deployment.name):
                    results.append(await self._single_create(deployment, request))
            except TransientGatewayError as exc:
                return results + [exc] * (len(requests) - index)
            except GatewayError as exc:
                results.append(exc)
        return results

    async def _create_sent(self) -> None:
        """Return once the next create request has been written to the server."""
        await self._written.wait()

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook of a create call: its request body is on the wire."""
        if event == "http11.send_request_body.complete":
            self._signal_written()

    def _signal_written(self) -> None:
        written, self._written = self._written, asyncio.Event()
        written.set()

    async def _bulk_create(
        self, deployment: Deployment, requests: list[RunRequest]
    ) -> list[str | Exception]:
        body = create_bodies(requests)
        await self.pacer.pace()
        response = await self.client.request(
            "POST",
            _BULK_PATH,  # type: ignore[arg-type]  # a route Prefect's client has no method for
            path_params={"id": deployment.id},
            json=body,
            extensions={"trace": self._trace},
        )
        response.raise_for_status()
        return [bulk_item(item) for item in response.json()["results"]]

    async def _single_create(self, deployment: Deployment, request: RunRequest) -> str:
        await self.pacer.pace()
        run = await self.client.create_flow_run_from_deployment(
            deployment.id,  # type: ignore[arg-type]  # Prefect accepts the id as a string
            **create_fields(request),
        )
        return str(run.id)

    async def read_runs(
        self, flow_run_ids: list[str], *, final_only: bool = False
    ) -> list[RunSnapshot]:
        """Current state of the given runs, ``READ_BATCH`` ids per call.

        ``final_only`` asks the server for the runs among them in a final state only:
        a reconciliation of 10,000 pending runs then costs the daemon almost nothing
        to parse while nothing has ended.
        """
        snapshots: list[RunSnapshot] = []
        state = (
            FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(FINAL_STATE_TYPES)))
            if final_only
            else None
        )
        for start in range(0, len(flow_run_ids), READ_BATCH):
            chunk = flow_run_ids[start : start + READ_BATCH]
            async for attempt in (retrying := self._retrying("read_flow_runs")):
                with attempt, translate_errors("read flow runs"):
                    async with retrying.bound():
                        runs = await self.client.read_flow_runs(
                            flow_run_filter=FlowRunFilter(
                                id=FlowRunFilterId(any_=chunk),
                                state=state,
                            ),
                            limit=len(chunk),
                        )
            snapshots.extend(snapshot_from_run(run) for run in runs)
        return snapshots

    async def count_finished(self, tag: str, since: datetime, until: datetime) -> int | None:
        """How many runs carrying ``tag`` reached a final state with ``since <= end_time < until``.

        ``None``, without a request, while the API answers 429: the count is a check
        the tracker repeats, and a rate limit's budget goes to the creates.
        """
        if self.pacer.throttled:
            return None
        count = 0
        async for attempt in (retrying := self._retrying("count_flow_runs")):
            with attempt, translate_errors("count flow runs"):
                async with retrying.bound():
                    count = await self.client.count_flow_runs(
                        flow_run_filter=finished_filter(tag, since, until)
                    )
        return count

    async def read_finished(self, tag: str, since: datetime, until: datetime) -> list[RunSnapshot]:
        """The runs carrying ``tag`` that reached a final state with ``since <= end_time < until``.

        ``READ_BATCH`` per call, in id order, until a page comes back short.
        """
        snapshots: list[RunSnapshot] = []
        while True:
            runs: list[FlowRun] = []
            async for attempt in (retrying := self._retrying("read_flow_runs")):
                with attempt, translate_errors("read flow runs"):
                    async with retrying.bound():
                        runs = await self.client.read_flow_runs(
                            flow_run_filter=finished_filter(tag, since, until),
                            sort=FlowRunSort.ID_DESC,
                            limit=READ_BATCH,
                            offset=len(snapshots),
                        )
            snapshots.extend(snapshot_from_run(run) for run in runs)
            if len(runs) < READ_BATCH:
                return snapshots

    async def cancel_run(self, flow_run_id: str, reason: str | None = None) -> RunSnapshot | None:
        """Ask Prefect to cancel a run (its worker or runner stops it); return the state it is in.

        ``reason`` is the Cancelling state's message (why flowsubmit cancelled the run):
        Prefect shows it in the run's state history (not for a Scheduled run, which
        Prefect's own rule moves to a Cancelled state of its own, without a message).

        Not forced, as ``prefect flow-run cancel`` does it: Prefect's orchestration then
        refuses to cancel a run that has just reached a final state instead of
        overwriting it, and moves a Scheduled run with no infrastructure straight to
        Cancelled. ``None`` when Prefect did not say.
        """
        result: OrchestrationResult[Any] | None = None
        async for attempt in (retrying := self._retrying("cancel_flow_run")):
            with attempt, translate_errors("cancel flow run"):
                async with retrying.bound():
                    result = await self.client.set_flow_run_state(
                        flow_run_id, Cancelling(message=reason)
                    )
        state = result.state if result is not None else None
        if state is None:
            return None
        return RunSnapshot(
            flow_run_id=flow_run_id,
            state_type=state.type.value,
            state_name=state.name or state.type.value.title(),
            state_id=str(state.id),
            end_time=plain(state.timestamp) if state.type.value in FINAL_STATE_TYPES else None,
            source="cancel",
            occurred=plain(state.timestamp),
            state_message=state.message or None,
        )

    @contextlib.asynccontextmanager
    async def run_events(self, tag: str) -> AsyncIterator[AsyncIterator[RunSnapshot]]:
        """One websocket subscription for the state changes of every run tagged ``tag``.

        Raises:
            TransientGatewayError: the stream could not be opened, or dropped for good.
        """
        event_filter = EventFilter(
            event=EventNameFilter(
                prefix=["prefect.flow-run."],
                exclude_name=[f"prefect.flow-run.{name}" for name in UNSUBSCRIBED_EVENTS],
            ),
            # `any_resource` (unlike `related`) is applied to live events as well as to
            # the backfill, so the server sends us only flowsubmit's runs.
            any_resource=EventAnyResourceFilter(id=[f"prefect.tag.{tag}"]),
        )
        subscriber = get_events_subscriber(
            filter=event_filter, reconnection_attempts=self.reconnection_attempts
        )
        with translate_errors("open event stream"):
            try:
                await subscriber.__aenter__()
            except (httpx.HTTPError, OSError, TimeoutError):
                raise
            except Exception as exc:
                # A refused handshake (websockets' InvalidStatus/InvalidMessage while the
                # server restarts), ConnectionClosed after the subscriber's own retries, or
                # an auth failure: none is an OSError, and each must put the tracker into
                # polling rather than kill its stream task.
                raise TransientGatewayError(
                    f"open event stream: {type(exc).__name__}: {exc}",
                    operation="open event stream",
                ) from exc
        try:
            yield _snapshots(subscriber)
        finally:
            # websockets waits up to 10 s for the server's answer to its close frame, and
            # Prefect's server reads from an idle subscriber's socket only now and then
            # (measured: a daemon with nothing running took 10 s to stop). Nothing is
            # left to read: a stop or a resubscribe does not wait for that answer.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(STREAM_CLOSE_S):
                    await subscriber.__aexit__(None, None, None)


#: Flow-run events the stream does not ask for. Each would cost a parse of Prefect's
#: ``Event`` (about 40 µs, half the stream at four events a run) and tells the tracker
#: nothing it lacks: a run it created while the stream was live is covered from its
#: creation (``Tracker.watch``), Pending is "not started" as Scheduled is, and a
#: heartbeat is not a state.
UNSUBSCRIBED_EVENTS = ("Scheduled", "Pending", "heartbeat")


def _route(request: httpx.Request) -> str:
    return f"{request.method} {request.url.path.split('/api', 1)[-1]}"


def _bulk_route_missing(response: httpx.Response) -> bool:
    """A 404 or 405 for the bulk route itself (a proxy that does not pass it, or a server that
    misreports its version), told apart from the route's own 404 for an unknown deployment."""
    if response.status_code == 405:
        return True
    if response.status_code != 404:
        return False
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return True
    return bool(detail != "Deployment not found")


async def _snapshots(subscriber: Any) -> AsyncIterator[RunSnapshot]:
    while True:
        with translate_errors("event stream"):
            try:
                event = await subscriber.__anext__()
            except StopAsyncIteration:
                raise TransientGatewayError(
                    "event stream: closed by the server", operation="event stream"
                ) from None
            except Exception as exc:
                # websockets' ConnectionClosed and Prefect's auth failures are not OSErrors.
                if isinstance(exc, TransientGatewayError):
                    raise
                raise TransientGatewayError(
                    f"event stream: {type(exc).__name__}: {exc}", operation="event stream"
                ) from exc
        snapshot = snapshot_from_event(event)
        if snapshot is not None:
            yield snapshot
