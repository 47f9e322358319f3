"""Submission throughput against a local SQLite-backed Prefect server: bulk vs single creates, by calls in flight.

Run: ``.venv/bin/python bench/submission.py [runs]``. Prints a table; asserts nothing.
Each configuration gets a fresh deployment on one server; every run is created
with an idempotency key and counted on the server afterwards (lost = asked - found).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

from flowsubmit.local.localserver import LocalServer


async def _one(runs: int, inflight: int, batch: int, bulk: bool) -> tuple[float, int, int, int]:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flowsubmit._types import RunRequest
    from flowsubmit.gateway.client import Gateway

    name = f"bench-{uuid.uuid4().hex[:6]}"

    @flow(name=name)
    def bench_flow(i: int = 0) -> int:
        return i

    deployment_spec = await bench_flow.to_deployment(name="d")  # type: ignore[misc]
    await deployment_spec.apply()
    tag = f"tag-{name}"
    async with Gateway(max_inflight_submissions=inflight, submit_batch_size=batch) as gateway:
        gateway._bulk = bulk  # the single-create path, as on servers without the bulk route
        deployment = await gateway.resolve_deployment(f"{name}/d")
        requests = [RunRequest(f"{name}/{i}", {"i": i}, tags=(tag,)) for i in range(runs)]
        start = time.perf_counter()
        results = await asyncio.gather(
            *(gateway.create_run(deployment, r) for r in requests), return_exceptions=True
        )
        elapsed = time.perf_counter() - start
        calls = sum(n for route, n in gateway.requests.items() if "create_flow_run" in route)
    failed = sum(1 for r in results if isinstance(r, BaseException))
    async with get_client() as client:
        found = await client.count_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
    return elapsed, runs - found, calls, failed


async def main(runs: int) -> None:
    print(
        f"{'mode':<8} {'in flight':>9} {'batch':>6} {'runs':>5} {'seconds':>8} {'runs/s':>7} {'lost':>5} {'create calls':>12} {'errors':>6}"
    )
    for bulk, inflight, batch in [
        (False, 1, 1),
        (False, 2, 1),
        (False, 8, 1),
        (True, 1, 50),
        (True, 1, 100),
        (True, 2, 50),
        (True, 2, 100),
        (True, 8, 50),
    ]:
        elapsed, lost, calls, errors = await _one(runs, inflight, batch, bulk)
        mode = "bulk" if bulk else "single"
        print(
            f"{mode:<8} {inflight:>9} {batch:>6} {runs:>5} {elapsed:>8.2f} {runs / elapsed:>7.1f} {lost:>5} {calls:>12} {errors:>6}"
        )


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with LocalServer() as server:
        os.environ.update(server.env())
        asyncio.run(main(n))
