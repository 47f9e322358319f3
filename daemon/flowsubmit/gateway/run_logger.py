"""The logger of the Prefect flow or task run the code runs inside, if any."""

from __future__ import annotations

import logging

__all__ = ["current_run_logger"]


def current_run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger] | None:
    """Prefect's ``get_run_logger()`` inside a flow or task run, else ``None``."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    return get_run_logger()
