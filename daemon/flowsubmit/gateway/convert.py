"""What flowsubmit sends to Prefect and reads back, converted one way or the other.

Owns the shapes at the boundary: a ``RunRequest`` as the bulk route's item, a bulk
result item as a run id or an error, a read run or a state-change event as a
``RunSnapshot`` (with plain datetimes), the filter of runs that ended in a window,
and the check of a run's parameters against its deployment's schema. Pure functions:
no call to Prefect is made here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, overload

from jsonschema.exceptions import best_match  # type: ignore[import-untyped]
from prefect.client.schemas.actions import DeploymentFlowRunCreate
from prefect.client.schemas.filters import (
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.events.schemas.events import Event
from prefect.states import Scheduled, to_state_create
from prefect.utilities.schema_tools.validation import (
    CircularSchemaRefError,
    ValidationError,
    preprocess_schema,
    validate,
)

from flowsubmit._types import FINAL_STATE_TYPES, Deployment, RunRequest, RunSnapshot
from flowsubmit.errors import ContentionError, PermanentGatewayError
from flowsubmit.gateway.older_clients import FlowRunFilter, FlowRunFilterEndTime
from flowsubmit.gateway.translate import TRANSIENT_DB_ERROR
from flowsubmit.redaction import mentions_secret

__all__ = [
    "bulk_item",
    "create_bodies",
    "create_fields",
    "finished_filter",
    "first_parameter_problem",
    "is_json",
    "parameter_problem",
    "plain",
    "snapshot_from_event",
    "snapshot_from_run",
]


def parameter_problem(
    deployment: Deployment, parameters: dict[str, Any]
) -> tuple[str, str | None] | None:
    """Check one run's ``parameters`` against the deployment's schema (``first_parameter_problem``)."""
    problem = first_parameter_problem(deployment, [parameters])
    return None if problem is None else problem[1:]


def first_parameter_problem(
    deployment: Deployment, runs: Sequence[dict[str, Any]]
) -> tuple[int, str, str | None] | None:
    """Check the parameters of ``runs`` against the deployment's schema before anything is created.

    Returns:
        ``None`` when every run's fit, else (the position of the first run that does not,
        what is wrong, the parameter concerned). Unknown names are refused here because
        Prefect accepts them and the run crashes later.
    """
    schema = deployment.parameter_schema
    properties = schema.get("properties")
    unknown: tuple[int, str, str | None] | None = None
    if isinstance(properties, dict):
        for position, parameters in enumerate(runs):
            if names := sorted(set(parameters) - set(properties)):
                takes = ", ".join(sorted(properties)) or "none"
                unknown = (
                    position,
                    f"the flow takes no parameter {names[0]!r} (it takes: {takes})",
                    names[0],
                )
                break
    checked = len(runs) if unknown is None else unknown[0]
    if not schema or not checked:
        return unknown
    defaults = deployment.default_parameters
    try:
        errors = _schema_errors([{**defaults, **p} for p in runs[:checked]], schema)
    except ValidationError as exc:  # a $ref that cannot be resolved
        return 0, f"the deployment's parameter schema rejects it: {exc}", None
    except CircularSchemaRefError:
        return unknown
    if not errors:
        return unknown
    position = min(error.path[0] for error in errors)
    # Chosen as jsonschema.validate chooses, without its check of the schema against the
    # metaschema on every call (~25x the validation itself).
    cause = best_match(error for error in errors if error.path[0] == position)
    path = list(cause.absolute_path)[1:]  # the run's own path, below its position
    reason = cause.message
    if mentions_secret(path, cause.instance):
        # jsonschema's message echoes the value: never for a secret.
        rule = f"{cause.validator}={cause.validator_value!r}"
        reason = f"the value does not fit the rule {rule} (not shown: it looks like a secret)"
    field = ".".join(str(p) for p in path) or None
    return position, f"the deployment's parameter schema rejects it: {reason}", field


def _schema_errors(instances: list[dict[str, Any]], schema: dict[str, Any]) -> list[Any]:
    """Prefect's validation errors of each instance against ``schema``, in one call: the instances
    are the items of one array (each error's path starts with its item's position).

    Prefect's ``validate`` preprocesses the schema and builds a validator on every call,
    60 % of its cost for one run's parameters; a 10,000-run job pays them once.
    """
    run_schema = preprocess_schema(schema)
    # The runs' schema is the array's items; its references (#/definitions/...) are to
    # the document's root, which the array's schema becomes: they go along.
    array_schema = {"type": "array", "items": run_schema}
    array_schema.update({k: run_schema[k] for k in ("definitions", "$defs") if k in run_schema})
    return validate(instances, array_schema, preprocess=False)  # type: ignore[arg-type]


def bulk_item(item: dict[str, Any]) -> str | Exception:
    """One result of the bulk route. The route reports every per-run exception as FAILED,
    database contention ("database is locked") included: that one is transient."""
    if item.get("status") == "CREATED" and item.get("flow_run_id"):
        return str(item["flow_run_id"])
    error = str(item.get("error"))
    cls = ContentionError if TRANSIENT_DB_ERROR.search(error) else PermanentGatewayError
    first_line = error.strip().splitlines()[0] if error.strip() else "no reason given"
    return cls(
        f"create flow run: Prefect refused it: {first_line[:300]}", operation="create_flow_run"
    )


def create_bodies(requests: list[RunRequest]) -> list[dict[str, Any]]:
    """The bulk route's items, as Prefect's ``DeploymentFlowRunCreate`` dumps them, with one Scheduled state for the call.

    The state is made and dumped once per call (its scheduled time, "now", is the
    same for every run of it): made per run, it cost two thirds of the 50 µs a body took.
    """
    state = to_state_create(Scheduled()).model_dump(mode="json", exclude_unset=True)
    bodies = []
    for request in requests:
        body = create_fields(request)
        if not (is_json(body["parameters"]) and is_json(body["job_variables"])):
            # Prefect's model turns what JSON has no type for (a pydantic model, a date,
            # a tuple) into JSON; plain JSON (every daemon job's) it dumps as given, at
            # 23 µs a run: the fields are the body then.
            body = DeploymentFlowRunCreate(**body).model_dump(mode="json", exclude_unset=True)
        body["state"] = state
        bodies.append(body)
    return bodies


#: Types of a JSON value that hold no other value (``bool`` is not an ``int`` here: ``type``).
_JSON_SCALARS = frozenset({str, int, bool, type(None)})


def is_json(value: Any) -> bool:
    """Whether ``value`` is plain JSON, as a job file gives it: dicts keyed by str, lists,
    strings, finite numbers, booleans and null, and nothing else (no subclass)."""
    kind = type(value)
    if kind in _JSON_SCALARS:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        return all(type(key) is str and is_json(item) for key, item in value.items())
    if kind is list:
        return all(is_json(item) for item in value)
    return False


def create_fields(request: RunRequest) -> dict[str, Any]:
    """What a run is created with, by the bulk route and by a single create alike (its state aside)."""
    return {
        "parameters": request.parameters,
        "tags": list(request.tags),
        "idempotency_key": request.idempotency_key,
        "work_queue_name": request.work_queue_name,
        "job_variables": request.job_variables or None,
        "name": request.name,
    }


def finished_filter(tag: str, since: datetime, until: datetime) -> FlowRunFilter:
    """Final runs carrying ``tag`` whose end time is in ``[since, until)`` (Prefect's before_ is inclusive)."""
    return FlowRunFilter(
        tags=FlowRunFilterTags(all_=[tag]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=sorted(FINAL_STATE_TYPES))),
        end_time=FlowRunFilterEndTime(after_=since, before_=until - timedelta(microseconds=1)),
    )


@overload
def plain(value: datetime) -> datetime: ...
@overload
def plain(value: datetime | None) -> datetime | None: ...
def plain(value: datetime | None) -> datetime | None:
    """A plain ``datetime`` for one of Prefect's (a pendulum subclass on Python < 3.13).

    Snapshots leave the gateway with plain datetimes: on pendulum's, every
    subtraction (a run's duration, its detection latency) goes through deprecation
    wrappers and builds an ``Interval``, about 24 µs where a plain one takes 0.04.
    """
    if value is None or type(value) is datetime:
        return value
    return datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=UTC if value.utcoffset() == timedelta(0) else value.tzinfo,
    )


def snapshot_from_run(run: FlowRun) -> RunSnapshot:
    state = run.state
    return RunSnapshot(
        flow_run_id=str(run.id),
        state_type=state.type.value if state else "PENDING",
        state_name=(state.name or state.type.value.title()) if state else "Unknown",
        flow_run_name=run.name,
        state_id=str(state.id) if state else None,
        start_time=plain(run.start_time),
        end_time=plain(run.end_time),
        source="poll",
        occurred=plain(state.timestamp) if state else None,
        state_message=(state.message or None) if state else None,
    )


def snapshot_from_event(event: Event) -> RunSnapshot | None:
    """A flow-run state-change event as a snapshot; ``None`` for other events."""
    resource = event.resource
    state_type = resource.get("prefect.state-type")
    run_id = resource.id.removeprefix("prefect.flow-run.")
    if not state_type or run_id == resource.id:
        return None
    final = state_type in FINAL_STATE_TYPES
    occurred = plain(event.occurred)
    # A dozen names in all, and a final snapshot is kept until its job ends: one string
    # each, not two per run (about 110 bytes a run).
    return RunSnapshot(
        flow_run_id=run_id,
        state_type=sys.intern(state_type),
        state_name=sys.intern(resource.get("prefect.state-name") or state_type.title()),
        flow_run_name=resource.get("prefect.resource.name"),
        state_id=str(event.id),
        start_time=occurred if state_type == "RUNNING" else None,
        end_time=occurred if final else None,
        source="event",
        occurred=occurred,
        state_message=resource.get("prefect.state-message") or None,
    )
