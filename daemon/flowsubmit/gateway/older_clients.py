"""What an older Prefect client needs before flowsubmit can use it.

Prefect 3.4's ``StateCreate`` names ``ResultRecordMetadata`` in a forward reference
that its module imports only for type checkers, so building a create body
(``to_state_create``) fails with ``PydanticUserError: StateCreate is not fully
defined``. Rebuilding the model with that name supplied is what Prefect's later
releases do at import; a client that needs nothing is left alone.
"""

from __future__ import annotations

import contextlib
import importlib

from prefect.client.schemas.actions import DeploymentFlowRunCreate, StateCreate

__all__ = ["complete_models"]

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
