"""Prefect's event feed and automations, read and written through the real API.

``within`` points the test process's client at another server for a block.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

__all__ = [
    "create_deployment",
    "job_events",
    "runs_of",
    "wait_for_artifact",
    "wait_for_events",
    "within",
]


@contextmanager
def within(api_url: str) -> Iterator[None]:
    """The test process's Prefect client talks to ``api_url`` in the block."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


async def job_events(job_id: str) -> list[dict[str, Any]]:
    """The events of resource ``flowsubmit.job.<job_id>`` on the server's feed, oldest first."""
    body = {
        "filter": {"resource": {"id": [f"flowsubmit.job.{job_id}"]}, "order": "ASC"},
        "limit": 50,
    }
    async with get_client() as client:
        reply = await client.request("POST", "/events/filter", json=body)  # type: ignore[arg-type]
    return reply.json()["events"]  # type: ignore[no-any-return]


def wait_for_events(job_id: str, names: set[str], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The job's events once every name of ``names`` is on the feed (the feed is written asynchronously)."""

    async def wait() -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            while True:
                events = await job_events(job_id)
                if names <= {e["event"] for e in events}:
                    return events
                await asyncio.sleep(0.5)

    return asyncio.run(wait())


async def create_deployment(flow_name: str, name: str) -> str:
    """A deployment that nothing serves (its runs stay Scheduled unless driven); its id."""
    async with get_client() as client:
        flow_id = await client.create_flow_from_name(flow_name)
        return str(await client.create_deployment(flow_id=flow_id, name=name))


async def runs_of(deployment_id: str) -> list[dict[str, Any]]:
    """Every flow run of a deployment, as the API returns them."""
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    async with get_client() as client:
        reply = await client.request("POST", "/flow_runs/filter", json=body)  # type: ignore[arg-type]
    return reply.json()  # type: ignore[no-any-return]


async def wait_for_artifact(key: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The artifacts of ``key`` once there is one (it is created after the job's result)."""
    body = {"artifacts": {"key": {"any_": [key]}}}
    async with get_client() as client, asyncio.timeout(timeout_s):
        while True:
            reply = await client.request("POST", "/artifacts/filter", json=body)  # type: ignore[arg-type]
            if found := reply.json():
                return found  # type: ignore[no-any-return]
            await asyncio.sleep(0.5)
