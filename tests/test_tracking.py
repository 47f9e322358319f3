"""Tracking against the real server: one subscription, reconcile reads, fallback to polling and hand-back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Running
from structlog.testing import capture_logs

from flowsubmit._types import RunRequest, RunSnapshot
from flowsubmit.gateway import Gateway
from flowsubmit.localserver import LocalServer
from flowsubmit.tracker import Tracker, TrackerMode
from tests.driver import drive
from tests.flows import DRIVEN, TIMEOUT, driven

#: Safety net for awaiting outcomes; not a timing claim (those live in bench/).
PATIENCE_S = 60.0
READ_ROUTE = "POST /flow_runs/filter"


class Proxy:
    """A loopback TCP proxy in front of a Prefect server that can refuse and cut its websockets.

    Plain HTTP always passes; a connection whose first request asks for a websocket
    upgrade is refused (HTTP 503) while ``refuse_websockets`` is set.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refuse_websockets = False
        self._server: asyncio.Server | None = None
        self._sockets: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def api_url(self) -> str:
        """The Prefect API, through the proxy."""
        return f"http://127.0.0.1:{self.port}/api"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut_websockets(refuse=True)
        await self._server.wait_closed()

    def cut_websockets(self, refuse: bool = True) -> None:
        """Close every websocket now passing through; refuse new ones while ``refuse``."""
        self.refuse_websockets = refuse
        for writer in list(self._sockets):
            writer.close()
        self._sockets.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        websocket = b"upgrade: websocket" in head.lower()
        if websocket and self.refuse_websockets:
            # As a proxy or a server still starting answers: not a network error, an HTTP one.
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        if websocket:
            self._sockets.update((writer, up_writer))
        up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._sockets.difference_update((writer, up_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def tracking(
    tag: str, api_url: str | None = None, **tracker_settings: Any
) -> AsyncIterator[tuple[Gateway, Tracker]]:
    """An in-process Gateway and Tracker (subscribed to ``tag``), optionally through ``api_url``."""
    settings = {PREFECT_API_URL: api_url} if api_url else {}
    with temporary_settings(settings):
        async with (
            Gateway(outage_tolerance_s=120.0) as gateway,
            Tracker(gateway, tag=tag, **tracker_settings) as tracker,
        ):
            assert await tracker.wait_connected(timeout_s=PATIENCE_S)
            yield gateway, tracker


def _tag() -> str:
    return f"track-{uuid.uuid4().hex[:8]}"


async def _create(
    gateway: Gateway,
    count: int,
    tag: str,
    deployment: str = DRIVEN,
    first: int = 0,
    parameters: dict[str, Any] | None = None,
) -> list[str]:
    """Create ``count`` runs tagged ``tag`` (in bulk, as the executor does); return their ids."""
    resolved = await gateway.resolve_deployment(deployment)
    requests = [
        RunRequest(
            idempotency_key=f"{tag}/{i}",
            parameters={"table": i} if parameters is None else parameters,
            tags=(tag,),
        )
        for i in range(first, first + count)
    ]
    return list(await asyncio.gather(*(gateway.create_run(resolved, r) for r in requests)))


async def _finals(futures: list[asyncio.Future[RunSnapshot]]) -> list[RunSnapshot]:
    async with asyncio.timeout(PATIENCE_S):
        return list(await asyncio.gather(*futures))


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a condition the tracker reaches by itself (mode changes)."""
    async with asyncio.timeout(PATIENCE_S):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.05)


async def _server_truth(run_ids: list[str]) -> dict[str, tuple[str | None, str]]:
    """(state id, state type) of each run, read straight from the server."""
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))  # type: ignore[arg-type]
        )
    return {
        str(r.id): (str(r.state.id) if r.state else None, r.state.type.value if r.state else "")
        for r in runs
    }


def _recorded(snaps: list[RunSnapshot]) -> dict[str, tuple[str | None, str]]:
    return {s.flow_run_id: (s.state_id, s.state_type) for s in snaps}


def _tracker_events(logs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in logs if str(e["event"]).startswith("tracker.")]


async def test_stream_up_tracks_twenty_runs_with_a_handful_of_requests(
    served: LocalServer,
) -> None:
    """With the stream up, 20 runs are recorded from their events with almost no API reads.

    Two of them end before anyone watches them (the gap between create and watch):
    their final events are kept, not dropped.
    """
    tag = _tag()
    with capture_logs() as logs:
        async with tracking(tag, reconcile_interval_s=3600.0) as (gateway, tracker):
            ids = await _create(gateway, 20, tag)
            before = gateway.requests.copy()
            await drive(ids[:2])
            await asyncio.sleep(1.0)  # their final events arrive while nobody watches them
            futures = [tracker.watch(i) for i in ids]
            await drive(ids[2:15])
            await drive(ids[15:], final="Failed")
            snaps = await _finals(futures)
            spent = gateway.requests - before
            mode = tracker.mode

    assert [(s.state_type, s.final, s.succeeded) for s in snaps] == [
        ("COMPLETED", True, True)
    ] * 15 + [("FAILED", True, False)] * 5
    assert {s.source for s in snaps} == {"event"}
    assert _recorded(snaps) == await _server_truth(ids)
    assert sum(spent.values()) <= 2, spent  # a handful, not 20 x polls (the bench measures 0)
    assert mode is TrackerMode.STREAMING
    assert _tracker_events(logs) == ["tracker.streaming"]


async def test_stream_lost_mid_job_completes_by_polling_and_hands_back(
    served: LocalServer,
) -> None:
    """When the websocket is cut mid-job, polling finishes the runs; the stream is resumed when it returns."""
    tag = _tag()
    with capture_logs() as logs:
        async with (
            Proxy(served.port) as proxy,
            tracking(
                tag,
                proxy.api_url,
                poll_interval_s=0.5,
                reconcile_interval_s=3600.0,
                resubscribe_max_backoff_s=1.0,
            ) as (
                gateway,
                tracker,
            ),
        ):
            ids = await _create(gateway, 10, tag)
            futures = [tracker.watch(i) for i in ids]
            await drive(ids[:5])
            streamed = await _finals(futures[:5])

            proxy.cut_websockets(refuse=True)
            await _until(lambda: tracker.mode is TrackerMode.POLLING, "fallback")
            await drive(ids[5:], final="Failed")
            polled = await _finals(futures[5:])

            proxy.refuse_websockets = False
            await _until(lambda: tracker.mode is TrackerMode.STREAMING, "resume")
            again = await _create(gateway, 2, tag, first=10)
            more = [tracker.watch(i) for i in again]
            await drive(again)
            resumed = await _finals(more)

    assert [s.source for s in streamed] == ["event"] * 5
    assert [(s.source, s.state_type) for s in polled] == [("poll", "FAILED")] * 5
    assert [s.source for s in resumed] == ["event"] * 2
    assert _recorded(streamed + polled + resumed) == await _server_truth(ids + again)
    tracker_logs = [e for e in logs if str(e["event"]).startswith("tracker.")]
    assert [e["event"] for e in tracker_logs] == [
        "tracker.streaming",
        "tracker.fallback",
        "tracker.resumed",
    ]
    fallback, resumed_log = tracker_logs[1], tracker_logs[2]
    assert {k: v for k, v in fallback.items() if k != "reason"} == {
        "event": "tracker.fallback",
        "log_level": "warning",
        "mode": "polling",
        "pending": 5,
        "poll_interval_s": 0.5,
    }
    assert "event stream" in fallback["reason"]
    assert resumed_log == {
        "event": "tracker.resumed",
        "log_level": "info",
        "mode": "streaming",
        "pending": 0,
    }


async def test_timed_out_run_is_recorded_final_and_failed(served: LocalServer) -> None:
    """A flow that exceeds its timeout ends FAILED named TimedOut, and is recorded as final and failed."""
    tag = _tag()
    async with tracking(tag) as (gateway, tracker):
        (run_id,) = await _create(gateway, 1, tag, deployment=TIMEOUT, parameters={"seconds": 30})
        snap = await _finals([tracker.watch(run_id)])

    assert (snap[0].state_type, snap[0].state_name, snap[0].final, snap[0].succeeded) == (
        "FAILED",
        "TimedOut",
        True,
        False,
    )
    assert _recorded(snap) == await _server_truth([run_id])


async def test_run_finished_before_subscribing_is_recorded(served: LocalServer) -> None:
    """Runs that ended before the tracker subscribed are recorded at once, with the server's final state."""
    tag = _tag()
    async with Gateway() as creator:
        ids = await _create(creator, 5, tag)
    await drive(ids[:3])
    await drive(ids[3:], final="Failed")
    truth = await _server_truth(ids)

    # A steady reconciliation an hour away cannot be what finds them: the read of
    # runs watched without a live event does (or the stream's backfill of the last
    # minute of events, when the server had already persisted them).
    async with tracking(tag, reconcile_interval_s=3600.0) as (gateway, tracker):
        await asyncio.sleep(1.0)  # the daemon re-attaches runs once its tracker is up
        snaps = await _finals([tracker.watch(i) for i in ids])
        reads = gateway.requests[READ_ROUTE]

    assert _recorded(snaps) == truth
    assert [s.state_type for s in snaps] == ["COMPLETED"] * 3 + ["FAILED"] * 2
    assert tracker.recorded["event"] + tracker.recorded["poll"] == 5
    assert reads <= 1


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LocalServer]:
    """A second, private Prefect server (the session server stays untouched), with DRIVEN applied."""
    home = tmp_path / "prefect"
    home.mkdir()
    server = LocalServer(home=home)
    server.start()
    try:
        yield server
    finally:
        server.close()


async def _apply_driven(api_url: str) -> None:
    with temporary_settings({PREFECT_API_URL: api_url}):
        deployment = await driven.ato_deployment(name="driven-deployment")
        await deployment.aapply()


async def test_server_restart_mid_job_accounts_for_every_run_once(
    own_server: LocalServer,
) -> None:
    """The server stops and starts again on the same port and database mid-job: every run is recorded once."""
    await _apply_driven(own_server.api_url)
    tag = _tag()
    with temporary_settings({PREFECT_API_URL: own_server.api_url}), capture_logs() as logs:
        async with tracking(tag, poll_interval_s=0.5, resubscribe_max_backoff_s=1.0) as (
            gateway,
            tracker,
        ):
            ids = await _create(gateway, 20, tag)
            futures = [tracker.watch(i) for i in ids]
            await drive(ids[:8])
            await drive(ids[8:12], final="Failed")
            before = await _finals(futures[:12])
            async with get_client() as client:
                for run_id in ids[12:16]:
                    await client.set_flow_run_state(run_id, Running(), force=True)

            await asyncio.to_thread(own_server.stop)
            await asyncio.to_thread(own_server.start)
            await drive(ids[12:])
            after = await _finals(futures[12:])
            await _until(lambda: tracker.mode is TrackerMode.STREAMING, "resume")
            recorded = dict(tracker.recorded)
        truth = await _server_truth(ids)

    snaps = before + after
    assert [s.flow_run_id for s in snaps] == ids
    assert _recorded(snaps) == truth
    assert [s.state_type for s in snaps] == ["COMPLETED"] * 8 + ["FAILED"] * 4 + ["COMPLETED"] * 8
    assert sum(recorded.values()) == 20  # each run recorded exactly once
    events = _tracker_events(logs)
    assert events[:2] == ["tracker.streaming", "tracker.fallback"]
    assert events[-1] == "tracker.resumed"
