"""The gateway against the real server: idempotent creates, bulk batching, error translation."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.settings import PREFECT_API_URL, temporary_settings
from structlog.testing import capture_logs

from flowsubmit._types import RunRequest
from flowsubmit.engine.runset import idempotency_key
from flowsubmit.errors import PermanentGatewayError, TransientGatewayError
from flowsubmit.gateway.client import Gateway
from flowsubmit.local.localserver import LocalServer, free_port
from tests.support.flows import DRIVEN
from tests.support.proxy import Proxy, missing_route

pytestmark = pytest.mark.usefixtures("served")


async def _runs_tagged(tag: str) -> list[str]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
    return [str(r.id) for r in runs]


@contextlib.asynccontextmanager
async def _gateway_at(api_url: str, **options: float) -> AsyncIterator[Gateway]:
    """A Gateway whose Prefect client talks to ``api_url`` (a proxy in front of the session server)."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with Gateway(**options) as gateway:  # type: ignore[arg-type]
            yield gateway


async def test_same_job_index_and_attempt_twice_creates_one_run(served: LocalServer) -> None:
    """Submitting the same (job id, stage, index, attempt) again, in turn or at once, returns the first run."""
    tag = f"idem-{uuid.uuid4().hex[:8]}"
    async with Gateway() as gateway:
        deployment = await gateway.resolve_deployment(DRIVEN)
        request = RunRequest(
            idempotency_key(deployment.id, tag, 0, 0, 0), {"table": 1}, tags=(tag,)
        )
        first = await gateway.create_run(deployment, request)
        again = await gateway.create_run(deployment, request)
        concurrent = await asyncio.gather(
            *(gateway.create_run(deployment, request) for _ in range(5))
        )
        changed = await gateway.create_run(
            deployment, RunRequest(request.idempotency_key, {"table": 2}, tags=(tag,))
        )
    assert {again, *concurrent, changed} == {first}
    assert await _runs_tagged(tag) == [first]


async def test_concurrent_creates_go_out_in_bulk(
    served: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thirty creates issued together go out in a few bulk calls (the first carries ten, the
    call size's start) and become thirty distinct runs; none goes out on its own.

    A call the SQLite server refused whole ("database is locked": its own background
    writes) is sent again, by design: such calls are counted apart."""
    tag = f"bulk-{uuid.uuid4().hex[:8]}"
    calls: list[tuple[int, int]] = []  # (items sent, runs created) of each bulk call
    bulk_create = Gateway._bulk_create

    async def spied(self: Gateway, deployment: Any, requests: list[RunRequest]) -> Any:
        outcome = await bulk_create(self, deployment, requests)  # the real call still runs
        calls.append((len(requests), sum(isinstance(r, str) for r in outcome)))
        return outcome

    monkeypatch.setattr(Gateway, "_bulk_create", spied)
    async with Gateway() as gateway:
        deployment = await gateway.resolve_deployment(DRIVEN)
        requests = [
            RunRequest(idempotency_key(deployment.id, tag, 0, i, 0), {"table": i}, tags=(tag,))
            for i in range(30)
        ]
        ids = await asyncio.gather(*(gateway.create_run(deployment, r) for r in requests))
        route = f"POST /deployments/{deployment.id}/create_flow_run"
        bulk_calls, single_calls = gateway.requests[f"{route}/bulk"], gateway.requests[route]
    assert len(set(ids)) == 30
    creating = [sent for sent, created in calls if created]
    assert 2 <= len(creating) <= 3 and creating[0] == 10, calls
    assert bulk_calls == len(calls) and single_calls == 0
    assert sorted(await _runs_tagged(tag)) == sorted(ids)


async def test_unknown_deployment_is_a_permanent_error_that_says_so(served: LocalServer) -> None:
    """An unknown deployment raises PermanentGatewayError naming it (Prefect's own error prints as 'None')."""
    async with Gateway() as gateway:
        with pytest.raises(PermanentGatewayError) as info:
            await gateway.resolve_deployment("no-such-flow/no-such-deployment")
    assert "'no-such-flow/no-such-deployment'" in str(info.value)
    assert "404" in str(info.value)


async def test_unreachable_prefect_is_transient_and_bounded_by_the_tolerance() -> None:
    """With nothing listening, calls fail as TransientGatewayError once the outage tolerance is spent."""
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        async with Gateway(outage_tolerance_s=1.0) as gateway:
            with pytest.raises(TransientGatewayError, match="Prefect unreachable"):
                await gateway.resolve_deployment(DRIVEN)
            assert await gateway.healthy() is False


@pytest.mark.parametrize("status", [404, 405])
async def test_server_without_bulk_route_gets_runs_one_by_one_with_the_same_keys(
    served: LocalServer, status: int
) -> None:
    """When the bulk route answers 404/405, the gateway says so once and creates each run singly, keys unchanged."""
    tag = f"nobulk-{uuid.uuid4().hex[:8]}"
    rule = missing_route("/create_flow_run/bulk", status)
    with capture_logs() as logs:
        async with (
            Proxy(served.port, rule=rule) as proxy,
            _gateway_at(proxy.api_url) as gateway,
        ):
            deployment = await gateway.resolve_deployment(DRIVEN)
            requests = [
                RunRequest(idempotency_key(deployment.id, tag, 0, i, 0), {"table": i}, tags=(tag,))
                for i in range(6)
            ]
            first = await asyncio.gather(*(gateway.create_run(deployment, r) for r in requests))
            again = await asyncio.gather(*(gateway.create_run(deployment, r) for r in requests))
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )

    assert len(set(first)) == 6 and again == first
    assert sorted((str(r.id), r.idempotency_key) for r in runs) == sorted(
        zip(first, [r.idempotency_key for r in requests], strict=True)
    )
    assert proxy.count("/create_flow_run/bulk") == 1  # noticed once, never asked again
    singles = [s.status for s in proxy.seen if s.path.endswith("/create_flow_run")]
    assert len([s for s in singles if s < 300]) == 12  # six creates, six finds by key
    notices = [e for e in logs if e["event"] == "gateway.bulk_unavailable"]
    assert [(e["log_level"], e["status"]) for e in notices] == [("warning", status)]
