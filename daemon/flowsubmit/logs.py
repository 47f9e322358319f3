"""structlog configuration: JSON lines on stdout for machines, a console form for people."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from flowsubmit.redaction import redact

__all__ = ["configure", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask every value logged under a secret-like key, at any depth."""
    return redact(event_dict)  # type: ignore[no-any-return]


def _message_first(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Console only: show the human sentence (``message``) in place of the dotted event name."""
    message = event_dict.pop("message", None)
    if message is not None:
        event_dict["event"] = message
    return event_dict


def configure(
    fmt: Literal["json", "console"] = "json", level: str = "info", *, cache: bool = True
) -> None:
    """Configure structlog once for the process; called by the CLI and the demo only.

    ``cache=False`` keeps loggers re-reading the configuration (tests reconfigure).
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
    ]
    renderer: list[Processor]
    if fmt == "console":
        renderer = [_message_first, structlog.dev.ConsoleRenderer(colors=False)]
    else:
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=cache,
    )


def get_logger(name: str) -> Any:
    """A structlog logger; ``name`` is kept as the ``logger`` key."""
    return structlog.get_logger(logger=name)
