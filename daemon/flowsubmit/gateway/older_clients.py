"""What an older Prefect client needs before flowsubmit can use it.

Prefect 3.4's client has no ``FlowRunFilterEndTime`` (its server has the filter):
``FlowRunFilter`` here is the client's, given an ``end_time`` field when it lacks one,
so that the body it sends carries the filter the server understands.

Prefect 3.4's ``StateCreate`` names ``ResultRecordMetadata`` in a forward reference
that its module imports only for type checkers, so building a create body
(``to_state_create``) fails with ``PydanticUserError: StateCreate is not fully
defined``. Rebuilding the model with that name supplied is what Prefect's later
releases do at import; a client that needs nothing is left alone.
"""

from __future__ import annotations

import contextlib
import importlib
from datetime import datetime

from prefect.client.schemas import filters
from prefect.client.schemas.actions import DeploymentFlowRunCreate, StateCreate
from prefect.client.schemas.filters import FlowRunFilter as _ClientFlowRunFilter
from pydantic import BaseModel

__all__ = ["FlowRunFilter", "FlowRunFilterEndTime", "complete_models"]

if hasattr(filters, "FlowRunFilterEndTime"):
    FlowRunFilterEndTime = filters.FlowRunFilterEndTime
    FlowRunFilter = _ClientFlowRunFilter
else:  # pragma: no cover - only with an older client (make test-compat)

    class FlowRunFilterEndTime(BaseModel):  # type: ignore[no-redef]
        """Filter by ``FlowRun.end_time``, as the server's filter of the same name reads it."""

        before_: datetime | None = None
        after_: datetime | None = None
        is_null_: bool | None = None

    class FlowRunFilter(_ClientFlowRunFilter):  # type: ignore[no-redef]
        """The client's filter with the ``end_time`` field its release lacks."""

        end_time: FlowRunFilterEndTime | None = None


#: Where ``ResultRecordMetadata`` lives, newest release first.
_RESULT_RECORD_MODULES = ("prefect._internal.result_records", "prefect._result_records")


def complete_models() -> None:
    """Define the forward references the installed client left open; idempotent."""
    if StateCreate.__pydantic_complete__:
        return
    for name in _RESULT_RECORD_MODULES:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(name)
            namespace = {"ResultRecordMetadata": module.ResultRecordMetadata}
            StateCreate.model_rebuild(_types_namespace=namespace)
            DeploymentFlowRunCreate.model_rebuild(force=True)
            return
