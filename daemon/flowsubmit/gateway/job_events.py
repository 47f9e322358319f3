"""The job's life on Prefect's event feed: ``flowsubmit.job.*`` events, for automations.

Owns the events' shape (docs/operations.md, "Prefect events") and their delivery: one
event through Prefect's events client (its websocket, with its reconnection attempts),
bounded in time; a failure to deliver is logged (``events.emit_failed``) and never
raised, so an event can neither fail nor hold up a job. Never carries run parameters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from prefect.events.clients import get_events_client
from prefect.events.schemas.events import Event
from prefect.settings import PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES

from flowsubmit.logs import get_logger

__all__ = ["Event", "emit_job_event", "job_event", "max_related"]

log = get_logger("flowsubmit.events")

#: How long one delivery may take, reconnections included.
EMIT_TIMEOUT_S = 30.0
#: Reconnections the events client tries before giving the event up.
RECONNECTIONS = 3

#: True while this context delivers a job event (the events client's tasks inherit it).
_EMITTING: ContextVar[bool] = ContextVar("flowsubmit_emitting_event", default=False)


class _SaidOnceByUs(logging.Filter):
    """Drops the events client's own connection warnings while flowsubmit delivers an event:
    ``events.emit_failed`` says it once, naming the job, in the daemon's log format (a line of
    Prefect's own would break the JSON lines). Other users of the client are untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _EMITTING.get()


logging.getLogger("prefect.events.clients").addFilter(_SaidOnceByUs())


def max_related() -> int:
    """How many related resources Prefect accepts on one event."""
    return int(PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES.value())


def job_event(
    name: str,
    job_id: str,
    *,
    labels: Mapping[str, str],
    deployments: Iterable[tuple[str, str]],
    payload: Mapping[str, Any],
) -> Event:
    """The event ``flowsubmit.job.<name>`` about job ``job_id``.

    Args:
        labels: the job resource's labels (``flowsubmit.queue``, ``flowsubmit.producer``,
            ``flowsubmit.priority``), each a string.
        deployments: ``(id, flow/deployment)`` of the job's deployments, related to the
            event in their order, as many as Prefect accepts
            (``PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES``).
        payload: what happened (counts, summary line, result path); never parameters.
    """
    limit = max_related()
    related = [
        {
            "prefect.resource.id": f"prefect.deployment.{deployment_id}",
            "prefect.resource.role": "deployment",
            "prefect.resource.name": deployment_name,
        }
        for deployment_id, deployment_name in list(dict(deployments).items())[:limit]
    ]
    resource = {
        "prefect.resource.id": f"flowsubmit.job.{job_id}",
        "prefect.resource.name": job_id,
        **labels,
    }
    return Event(
        event=f"flowsubmit.job.{name}",
        resource=resource,
        related=related,
        payload=dict(payload),
    )


async def emit_job_event(event: Event) -> bool:
    """Deliver ``event`` to the Prefect server; True once sent, False (logged) on any failure."""
    emitting = _EMITTING.set(True)  # the client's tasks, made inside, inherit it
    try:
        async with asyncio.timeout(EMIT_TIMEOUT_S):
            async with get_events_client(reconnection_attempts=RECONNECTIONS) as client:
                await client.emit(event)
    except Exception as exc:  # an event is never worth a job: every failure is logged
        log.warning(
            "events.emit_failed",
            event_name=event.event,
            resource=event.resource.id,
            error=f"{type(exc).__name__}: {exc}",
        )
        return False
    finally:
        _EMITTING.reset(emitting)
    log.debug("events.emitted", event_name=event.event, resource=event.resource.id)
    return True
