"""What one daemon tells Prefect about its jobs besides their runs: the ``flowsubmit.job.*``
events (``gateway.job_events`` owns their shape and delivery) and, opted in, each ended
job's artifact (``gateway.job_artifact``); when each is sent, and the tasks sending them.

Each is sent in the background, after the fact it tells is durable (the claim, the
result file and the move): a job never waits for Prefect, and one lost never changes
a job. ``prefect_events = false`` turns the events off; ``prefect_artifacts = true``
turns the artifacts on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

from flowsubmit._types import JobStatus
from flowsubmit.engine.report import job_markdown
from flowsubmit.engine.results import JobResult
from flowsubmit.errors import GatewayError
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.job_artifact import create_job_artifact
from flowsubmit.gateway.job_events import emit_job_event, job_event, max_related
from flowsubmit.gateway.ui_links import run_ui_url
from flowsubmit.jobs.model import Job
from flowsubmit.jobs.policy import Producer

__all__ = ["Announcer"]

#: How long reading one related deployment's id may take.
RESOLVE_TIMEOUT_S = 10.0

#: The event each job status ends with.
ENDED = {
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.TIMED_OUT: "timed_out",
}


class Announcer:
    """Owns each running job's event labels and the tasks sending its events and artifact."""

    def __init__(self, queue_root: Path, *, events: bool, artifacts: bool = False) -> None:
        self._queue = str(queue_root)
        self._enabled = events
        self._artifacts = artifacts
        self._gateway: Gateway | None = None
        self._labels: dict[str, dict[str, str]] = {}
        self._tasks: set[asyncio.Task[object]] = set()

    def open(self, gateway: Gateway) -> None:
        """Send through ``gateway``'s server from now on (deployment ids are read through it)."""
        self._gateway = gateway

    def claimed(self, job_id: str, job: Job, producer: Producer, *, recovered: bool) -> None:
        """``flowsubmit.job.claimed``: the job is in ``processing/`` and starts (or restarts)."""
        self._labels[job_id] = {
            "flowsubmit.queue": self._queue,
            "flowsubmit.producer": producer.user or str(producer.uid),
            "flowsubmit.priority": str(job.priority),
        }
        deployments = [planned.stage.deployment for planned in job.plan.stages]
        payload = {"job_id": job_id, "runs": job.total_runs, "recovered": recovered}
        self._send("claimed", job_id, deployments, payload)

    def ended(self, result: JobResult, result_path: Path) -> None:
        """``flowsubmit.job.<completed|failed|cancelled|timed_out>``: the result is written and moved."""
        payload = {
            "job_id": result.job_id,
            "status": result.status.value,
            "summary": result.summary.as_dict(),
            "result_path": str(result_path),
            "duration_s": result.duration_s,
            "error": result.error,
        }
        deployments = [run.deployment for run in result.runs]
        self._send(ENDED[result.status], result.job_id, deployments, payload)
        self._labels.pop(result.job_id, None)
        if self._artifacts and self._gateway is not None:
            markdown = job_markdown(result, run_ui_url)
            self._spawn(
                create_job_artifact(self._gateway, result.job_id, markdown, result.summary.line),
                "flowsubmit-artifact",
            )

    async def drain(self, timeout_s: float) -> None:
        """Wait for the events and artifacts being sent, at most ``timeout_s``."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def _send(
        self, name: str, job_id: str, deployments: Iterable[str], payload: dict[str, Any]
    ) -> None:
        if not self._enabled or self._gateway is None:
            return
        labels = self._labels.get(job_id, {"flowsubmit.queue": self._queue})
        names = [*dict.fromkeys(deployments)][: max_related()]
        self._spawn(self._deliver(name, job_id, labels, names, payload), f"flowsubmit-event-{name}")

    def _spawn(self, work: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(
        self,
        name: str,
        job_id: str,
        labels: dict[str, str],
        deployments: list[str],
        payload: dict[str, Any],
    ) -> None:
        event = job_event(
            name,
            job_id,
            labels=labels,
            deployments=await self._deployment_ids(deployments),
            payload=payload,
        )
        await emit_job_event(event)

    async def _deployment_ids(self, names: list[str]) -> list[tuple[str, str]]:
        """``(id, name)`` of the deployments that resolve (an unknown one is left out)."""
        assert self._gateway is not None
        found = []
        for name in names:
            # A deployment that cannot be read now (unknown, Prefect away) is left out: the
            # event still goes, without it.
            with contextlib.suppress(GatewayError, TimeoutError):
                async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                    found.append(((await self._gateway.resolve_deployment(name)).id, name))
        return found
