"""The package's only door to structlog: its configuration, and the logger every module uses.

The daemon configures structlog (JSON lines on stdout for machines, a console form for
people); a library user never does, and then the same calls go to stdlib ``logging``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal, TextIO

import orjson
import structlog
from structlog.contextvars import bound_contextvars
from structlog.typing import EventDict, Processor, WrappedLogger

from flowsubmit._turn import TurnFlush
from flowsubmit.redaction import holds_secret, redact

__all__ = [
    "EngineLogger",
    "bound_contextvars",
    "configure",
    "get_logger",
    "render_console",
    "resolve_format",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _json_line(event_dict: EventDict, **dumps_kw: Any) -> str:
    """One JSON line: orjson (two lines a run; a tenth of json's time), json where orjson refuses.

    orjson refuses what json writes: a str that is not valid Unicode (a lone
    surrogate, as a file name's undecodable byte becomes), an int beyond 64 bits, a
    key that is not a str. Such a line is written by json, ASCII only: a surrogate
    escaped as ``\\udcff`` is written whatever stdout's encoding, never dropped.
    """
    try:
        return orjson.dumps(event_dict, default=dumps_kw["default"]).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(event_dict, default=dumps_kw["default"])


def _redact_secrets(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask every value logged under a secret-like key, at any depth (a line with none is not copied)."""
    if not holds_secret(event_dict):
        return event_dict
    return redact(event_dict)  # type: ignore[no-any-return]


#: Keys the console form never shows: the line's own frame, or said by the message already.
_CONSOLE_HIDDEN = frozenset({"timestamp", "level", "event", "message", "logger"})


def render_console(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    """Console only: one short line for people, the message first, then the keys that add something.

    ``message`` (the human sentence) replaces the dotted event name when there is one;
    keys whose value is None, or already written in the message, are left out
    (no ``hint=None``, no deployment repeated after ``[flow/deployment]``); a structure
    is written as compact JSON (``producer={"uid":0,"user":"root"}``), never as a Python repr.
    """
    stamp = str(event_dict.get("timestamp", ""))[11:19]
    level = str(event_dict.get("level", "info"))
    text = str(event_dict.get("message") or event_dict.get("event", ""))
    extras = [
        f"{key}={_console_value(value)}"
        for key, value in event_dict.items()
        if key not in _CONSOLE_HIDDEN
        and key != "exception"
        and value is not None
        and not (isinstance(value, str) and len(value) >= 4 and value in text)
    ]
    line = f"{stamp} {level:<7} {text}" + (f"  {' '.join(extras)}" if extras else "")
    exception = event_dict.get("exception")
    return f"{line}\n{exception}" if exception else line


def _console_value(value: Any) -> str:
    """A value as the console shows it: text as is, a structure as compact JSON (no Python repr)."""
    if isinstance(value, dict | list | tuple | bool) or value is None:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return str(value)


class _TurnStream:
    """The daemon's log stream: each line written as structlog renders it, the stream flushed
    once after the event-loop turn that wrote it (``TurnFlush``), not once a line."""

    def __init__(self, stream: TextIO) -> None:
        self.write = stream.write
        self.flush = TurnFlush(stream.flush).soon


def resolve_format(fmt: str, stream: Any = None) -> Literal["json", "console"]:
    """``auto`` is ``console`` on a terminal and ``json`` otherwise (systemd, containers, pipes)."""
    if fmt == "auto":
        return "console" if (stream or sys.stdout).isatty() else "json"
    return "console" if fmt == "console" else "json"


def configure(fmt: str = "json", level: str = "info", *, cache: bool = True) -> None:
    """Configure structlog once for the process; called by the CLI and the demo only.

    ``fmt`` is ``json``, ``console`` or ``auto`` (see ``resolve_format``).
    ``cache=False`` keeps loggers re-reading the configuration (tests reconfigure).
    """
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
    ]
    renderer: list[Processor]
    if resolve_format(fmt) == "console":
        renderer = [structlog.processors.format_exc_info, render_console]
    else:
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_json_line),
        ]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=_TurnStream(sys.stdout)),  # type: ignore[arg-type]
        cache_logger_on_first_use=cache,
    )


def get_logger(name: str) -> EngineLogger:
    """The logger of module ``name``: structlog in the daemon, stdlib ``logging`` in the library."""
    return EngineLogger(name)


class EngineLogger:
    """structlog events once ``configure`` ran (the daemon), else stdlib ``logging`` (the library).

    In library use the events go to the stdlib logger ``name`` as ``event key=value``
    messages (secrets masked), ``info`` ones at ``DEBUG``: the engine's own news
    (stream up, resumed) is not the script's, its warnings and errors are.
    """

    def __init__(self, name: str) -> None:
        self._struct = structlog.get_logger(name)
        self._std = logging.getLogger(name)

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(self._struct, level)(event, **fields)
            return
        exc_info = fields.pop("exc_info", None)
        text = " ".join([event, *(f"{k}={v}" for k, v in redact(fields).items())])
        std_level = _LEVELS[level] if _LEVELS[level] > logging.INFO else logging.DEBUG
        self._std.log(std_level, text, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        """Log at debug."""
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log at info (debug in library use)."""
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log at warning."""
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log at error."""
        self._emit("error", event, fields)
