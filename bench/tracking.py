"""Fan-in cost and speed: flowsubmit's tracker against per-run polling and Prefect's ``wait_for_flow_run``.

Run: ``.venv/bin/python bench/tracking.py`` (``make bench``). Prints a table; asserts nothing.

One local SQLite-backed server. For each row, N runs of a never-served deployment are
created in bulk and then driven Pending -> Running -> Completed (every 10th Failed) by
a separate driver process through the real API, so the server emits real events.
Detection latency of a run = the wall time at which the method under test had its
final state minus the run's ``end_time`` on the server (one host, one clock).
Requests are the HTTP requests the method sent while tracking (creates excluded);
websockets are counted apart. The flowsubmit tracker is opened once, as the daemon
opens it, and serves every stream-up row.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowsubmit.local.localserver import LocalServer

POLL_INTERVAL_S = 5.0
SEED_INTERVAL_S = 5.0
FLOW = "bench-driven"


@dataclass
class Row:
    """One measured configuration."""

    method: str
    runs: int
    latencies_s: list[float]
    requests: int
    websockets: int
    detail: str = ""

    def line(self) -> str:
        lat = sorted(self.latencies_s)
        p95 = lat[math.ceil(0.95 * len(lat)) - 1]  # nearest rank
        return (
            f"| {self.method} | {self.runs} | {statistics.median(lat):.3f} | {p95:.3f} | "
            f"{lat[-1]:.3f} | {self.requests} | {self.requests / self.runs:.3f} | {self.websockets} |"
        )


# -- the driver (a separate process, like the runners of real runs) ---------------------------


async def _drive(run_ids: list[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State
    from prefect.states import Completed, Failed, Pending, Running

    slots = asyncio.Semaphore(2)
    async with get_client() as client:

        async def one(index: int, run_id: str) -> None:
            final: State[Any] = Failed() if index % 10 == 9 else Completed()
            async with slots:
                for state in (Pending(), Running(), final):
                    await client.set_flow_run_state(run_id, state, force=True)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(run_ids)))


def _start_driver(run_ids: list[str]) -> subprocess.Popen[bytes]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(run_ids, f)
    return subprocess.Popen([sys.executable, __file__, "--drive", f.name])


async def _driven(run_ids: list[str], track: Awaitable[dict[str, float]]) -> dict[str, float]:
    driver = _start_driver(run_ids)
    try:
        async with asyncio.timeout(600):  # a bound, should a method never see a run end
            return await track
    finally:
        await asyncio.to_thread(driver.wait)


# -- helpers ------------------------------------------------------------------------------------


async def _deployment_name() -> str:
    from prefect import flow

    @flow(name=FLOW)
    def bench_driven(i: int = 0) -> int:
        return i

    spec = await bench_driven.ato_deployment(name="d")
    await spec.aapply()
    return f"{FLOW}/d"


async def _create(gateway: Any, deployment: Any, n: int) -> list[str]:
    from flowsubmit._types import RunRequest

    key = uuid.uuid4().hex[:8]
    requests = [RunRequest(f"bench/{key}/{i}", {"i": i}, tags=("flowsubmit",)) for i in range(n)]
    return list(await asyncio.gather(*(gateway.create_run(deployment, r) for r in requests)))


async def _end_times(run_ids: list[str]) -> dict[str, float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)),
            limit=len(run_ids),
        )
    return {str(r.id): r.end_time.timestamp() for r in runs if r.end_time}


def _latencies(seen: dict[str, float], ends: dict[str, float]) -> list[float]:
    return [seen[i] - ends[i] for i in seen]


def _counting_client() -> tuple[Any, Counter[str]]:
    from prefect.client.orchestration import get_client

    counter: Counter[str] = Counter()

    async def count(request: Any) -> None:
        counter[request.url.path] += 1

    return get_client(httpx_settings={"event_hooks": {"request": [count]}}), counter


# -- methods ------------------------------------------------------------------------------------


async def _tracker_row(method: str, gateway: Any, tracker: Any, n: int, deployment: Any) -> Row:
    sent = datetime.now(UTC)  # watched as a RunSet watches the runs it created
    ids = await _create(gateway, deployment, n)
    before, recorded = gateway.requests.copy(), dict(tracker.recorded)
    seen: dict[str, float] = {}

    async def track() -> dict[str, float]:
        futures = []
        for run_id in ids:
            future = tracker.watch(run_id, created_since=sent)
            future.add_done_callback(lambda _f, r=run_id: seen.setdefault(r, time.time()))
            futures.append(future)
        await asyncio.gather(*futures)
        return seen

    await _driven(ids, track())
    spent = gateway.requests - before
    sources = {k: v - recorded.get(k, 0) for k, v in tracker.recorded.items()}
    detail = f"recorded from {sources}; requests {dict(spent) or 'none'}"
    return Row(method, n, _latencies(seen, await _end_times(ids)), spent.total(), 0, detail)


async def _seed_row(gateway: Any, n: int, deployment: Any) -> Row:
    """The seed's method: one ``read_flow_run`` per pending run, every 5 s."""
    ids = await _create(gateway, deployment, n)
    client, counter = _counting_client()
    seen: dict[str, float] = {}

    async def track() -> dict[str, float]:
        async with client:
            pending = list(ids)
            while pending:
                for run_id in list(pending):
                    run = await client.read_flow_run(uuid.UUID(run_id))
                    if run.state and run.state.is_final():
                        seen[run_id] = time.time()
                        pending.remove(run_id)
                if pending:
                    await asyncio.sleep(SEED_INTERVAL_S)
        return seen

    await _driven(ids, track())
    return Row(
        "(a) read_flow_run per run, 5 s",
        n,
        _latencies(seen, await _end_times(ids)),
        sum(counter.values()),
        0,
    )


async def _wait_for_row(gateway: Any, n: int, deployment: Any) -> Row:
    """Prefect's own way: ``wait_for_flow_run`` gathered over every run (a websocket each)."""
    from prefect.flow_runs import wait_for_flow_run

    ids = await _create(gateway, deployment, n)
    client, counter = _counting_client()
    seen: dict[str, float] = {}

    async def one(run_id: str) -> None:
        await wait_for_flow_run(uuid.UUID(run_id), client=client)
        seen[run_id] = time.time()

    async def track() -> dict[str, float]:
        async with client:
            await asyncio.gather(*(one(r) for r in ids))
        return seen

    await _driven(ids, track())
    return Row(
        "(b) wait_for_flow_run gathered",
        n,
        _latencies(seen, await _end_times(ids)),
        sum(counter.values()),
        n,
    )


async def _visibility_probe(gateway: Any, tracker: Any, n: int, deployment: Any) -> str:
    """How far behind a final event the API read lags: what a confirming read would see."""
    from prefect.client.orchestration import get_client

    ids = await _create(gateway, deployment, n)
    lags: list[float] = []
    first_read_final = 0
    probes: list[asyncio.Task[None]] = []

    async with get_client() as client:

        async def probe(run_id: str, state_id: str | None, at: float) -> None:
            nonlocal first_read_final
            for attempt in range(500):
                run = await client.read_flow_run(uuid.UUID(run_id))
                if run.state and str(run.state.id) == state_id:
                    first_read_final += attempt == 0
                    lags.append(time.monotonic() - at)
                    return
                await asyncio.sleep(0.005)

        def on_final(future: asyncio.Future[Any], run_id: str) -> None:
            snap = future.result()
            probes.append(asyncio.create_task(probe(run_id, snap.state_id, time.monotonic())))

        async def track() -> dict[str, float]:
            futures = []
            for run_id in ids:
                future = tracker.watch(run_id)
                future.add_done_callback(lambda f, r=run_id: on_final(f, r))
                futures.append(future)
            await asyncio.gather(*futures)
            await asyncio.gather(*probes)
            return {}

        await _driven(ids, track())
    return (
        f"A read issued the moment each final event was recorded (N={n}) already showed "
        f"that state (same state id) in {first_read_final}/{n} cases; all {len(lags)} agreed "
        f"within {max(lags) * 1000:.0f} ms (the slowest of {n} concurrent reads)."
    )


async def main() -> None:
    from flowsubmit.engine.tracker import Tracker
    from flowsubmit.gateway.client import Gateway

    name = await _deployment_name()
    rows: list[Row] = []
    async with Gateway() as gateway:
        deployment = await gateway.resolve_deployment(name)
        async with Tracker(gateway, poll_interval_s=POLL_INTERVAL_S) as tracker:
            await tracker.wait_connected(timeout_s=30.0)
            # The daemon subscribes once at start and jobs come later. Runs created in the
            # first 0.25 s of a subscription cost one batched read (their events cannot be
            # told from the backfill), which is not the steady state measured here.
            await asyncio.sleep(1.0)
            for n in (20, 50, 200):
                rows.append(
                    await _tracker_row("flowsubmit, stream up", gateway, tracker, n, deployment)
                )
            probe = await _visibility_probe(gateway, tracker, 50, deployment)
        async with (
            Gateway() as polling_gateway,
            Tracker(polling_gateway, poll_interval_s=POLL_INTERVAL_S, use_events=False) as tracker,
        ):
            for n in (20, 200):
                rows.append(
                    await _tracker_row(
                        f"flowsubmit, stream down (poll {POLL_INTERVAL_S:g} s)",
                        polling_gateway,
                        tracker,
                        n,
                        deployment,
                    )
                )
        for n in (20, 200):
            rows.append(await _seed_row(gateway, n, deployment))
        for n in (20, 50):  # at 100+ one websocket per run wedges the SQLite-backed server
            rows.append(await _wait_for_row(gateway, n, deployment))

    print(
        "| method | N | median latency s | p95 s | max s | tracking requests | requests/run | websockets |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row.line())
    print()
    for row in rows:
        if row.detail:
            print(f"- {row.method}, N={row.runs}: {row.detail}")
    print()
    print(probe)


def _drive_main(path: str) -> None:
    run_ids = json.loads(Path(path).read_text())
    os.unlink(path)
    asyncio.run(_drive(run_ids))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--drive":
        _drive_main(sys.argv[2])
    else:
        with LocalServer() as server:
            os.environ.update(server.env())
            asyncio.run(main())
