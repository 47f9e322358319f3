"""A test driver that moves runs of the never-served deployment through their states with the real API.

A process per run is slow on two cores (the served runner executes about 1.3 runs/s),
so tests and benchmarks of many runs drive them instead: the server is real and so
are its events; only the flow's code does not run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from prefect.client.orchestration import get_client
from prefect.states import Completed, Failed, Late, Pending, Running, State

FINAL = {"Completed": Completed, "Failed": Failed}


async def drive(
    run_ids: Iterable[str], final: str = "Completed", concurrency: int = 2, *, direct: bool = False
) -> None:
    """Move each run Pending -> Running -> ``final`` (``Completed`` or ``Failed``), or straight to ``final`` if ``direct``."""
    slots = asyncio.Semaphore(concurrency)
    async with get_client() as client:

        async def one(run_id: str) -> None:
            async with slots:
                steps = [] if direct else [Pending(), Running()]
                for state in (*steps, FINAL[final]()):
                    await _set(client, run_id, state)

        await asyncio.gather(*(one(r) for r in run_ids))


async def late(run_ids: Iterable[str]) -> None:
    """Mark each run ``Late`` (type SCHEDULED) as the server's late-runs service does (it is off in tests)."""
    async with get_client() as client:
        for run_id in run_ids:
            await _set(client, run_id, Late())


async def start(run_ids: Iterable[str]) -> None:
    """Move each run Pending -> Running, and leave it there."""
    async with get_client() as client:
        for run_id in run_ids:
            for state in (Pending(), Running()):
                await _set(client, run_id, state)


async def _set(client: object, run_id: str, state: State[object]) -> None:
    await client.set_flow_run_state(run_id, state, force=True)  # type: ignore[attr-defined]


async def wait_for_runs(tag: str, count: int, timeout_s: float = 60.0) -> list[str]:
    """Wait until ``count`` runs carry ``tag`` on the server; return their ids."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as client, asyncio.timeout(timeout_s):
        while True:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
            )
            if len(runs) >= count:
                return [str(r.id) for r in runs]
            await asyncio.sleep(0.2)
