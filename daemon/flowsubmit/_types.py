"""Value types and protocols shared by the gateway, the tracker and the executor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

__all__ = [
    "FINAL_STATE_TYPES",
    "Deployment",
    "GatewayProtocol",
    "JobStatus",
    "RunRequest",
    "RunSnapshot",
]

#: Prefect state types after which a run never changes again. Finality is decided by
#: the state TYPE only: a flow timeout is type FAILED named "TimedOut", and users may
#: name states freely.
FINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


class JobStatus(StrEnum):
    """How a job ended, as written into its result file."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """One observation of a flow run's state, from an event or from an API read."""

    flow_run_id: str
    state_type: str
    state_name: str
    flow_run_name: str | None = None
    state_id: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    source: str = "poll"
    #: When the state was entered, by the server's clock (the event's ``occurred``).
    occurred: datetime | None = None
    #: Prefect's state message (a failed flow's exception text), unmasked.
    state_message: str | None = None

    @property
    def final(self) -> bool:
        """True when the run can never change state again."""
        return self.state_type in FINAL_STATE_TYPES

    @property
    def succeeded(self) -> bool:
        """Success is the state type COMPLETED, whatever the state's name."""
        return self.state_type == "COMPLETED"


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment resolved once per job: what submission and validation need of it."""

    id: str
    name: str
    parameter_schema: dict[str, Any] = field(default_factory=dict)
    default_parameters: dict[str, Any] = field(default_factory=dict)
    work_pool_name: str | None = None
    #: The work queue its runs go to unless a job names another (None: the pool's default).
    work_queue_name: str | None = None
    #: Prefect's ``READY`` (a worker or runner polled it lately) or ``NOT_READY``; None if unsaid.
    status: str | None = None


@dataclass(frozen=True, slots=True)
class RunRequest:
    """Everything needed to create one flow run; the idempotency key makes it repeatable."""

    idempotency_key: str
    parameters: dict[str, Any]
    tags: tuple[str, ...] = ()
    job_variables: dict[str, Any] = field(default_factory=dict)
    work_queue_name: str | None = None
    name: str | None = None
    #: Who the run belongs to (a job id): creates of one lane share that job's turns.
    lane: str = ""
    #: The job's ``priority``: a higher one gets its turns first (``gateway.scheduler``).
    priority: int = 0


class GatewayProtocol(Protocol):
    """What the tracker, the executor and the library need from Prefect.

    ``gateway.Gateway`` is the real implementation; unit tests of pure executor logic
    may use one hand-written fake of it.
    """

    async def resolve_deployment(self, name: str) -> Deployment:
        """Return the deployment called ``flow/deployment``."""
        ...

    async def check_work_queue(self, deployment: Deployment, work_queue_name: str) -> None:
        """Raise ``PermanentGatewayError`` unless the work queue exists in the deployment's pool."""
        ...

    async def create_run(self, deployment: Deployment, request: RunRequest) -> str:
        """Create (or find, by idempotency key) one run; return its id."""
        ...

    async def read_runs(
        self, flow_run_ids: list[str], *, final_only: bool = False
    ) -> list[RunSnapshot]:
        """Read the current state of the given runs, in as few calls as possible."""
        ...

    async def count_finished(self, tag: str, since: datetime, until: datetime) -> int | None:
        """How many runs carrying ``tag`` reached a final state with ``since <= end_time < until``; None if not asked now."""
        ...

    async def read_finished(self, tag: str, since: datetime, until: datetime) -> list[RunSnapshot]:
        """The runs carrying ``tag`` that reached a final state with ``since <= end_time < until``."""
        ...

    async def cancel_run(self, flow_run_id: str, reason: str | None = None) -> RunSnapshot | None:
        """Ask Prefect to cancel a run; ``reason`` is the Cancelling state's message."""
        ...

    def run_events(self, tag: str) -> AbstractAsyncContextManager[AsyncIterator[RunSnapshot]]:
        """Open one event subscription for every flow run carrying ``tag``."""
        ...
