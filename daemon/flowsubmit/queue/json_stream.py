"""A JSON document written as it is encoded: the result file of a 100,000-run job is never whole in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

__all__ = ["json_chunks"]


#: Bytes gathered before a chunk of a JSON document is handed to the file.
_CHUNK_BYTES = 64 * 1024

#: What orjson must hand to ``str`` as json's ``default=str`` does, not write its own way.
_ORJSON_OPTIONS = (
    orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)


def json_chunks(value: Any) -> Iterator[bytes]:
    """``value`` as indented JSON and a newline, in chunks; an iterator held in its objects is an array written as it is read.

    The bytes are those of ``json.dumps(value, indent=2, ensure_ascii=False,
    default=str)`` with every iterator made a list, but for floats, which orjson
    writes in its own shortest form (``1e16``, json ``1e+16``; NaN and Infinity as
    ``null``). Each item of a streamed array is encoded by orjson (4 µs a result's
    run entry; the json module encodes in Python with ``indent``: 23 µs), or by json
    where orjson refuses it (a lone surrogate, an int beyond 64 bits, a key that is
    not a str).
    """
    buffer = bytearray()
    for piece in _pieces(value, 0):
        buffer += piece
        if len(buffer) >= _CHUNK_BYTES:
            yield bytes(buffer)
            buffer.clear()
    buffer += b"\n"
    yield bytes(buffer)


def _pieces(value: Any, level: int) -> Iterator[bytes]:
    if isinstance(value, Iterator):
        yield from _array(value, level)
    elif isinstance(value, Mapping) and any(isinstance(v, Iterator) for v in value.values()):
        yield from _object(value, level)
    else:
        yield _encoded(value, level)


def _object(value: Mapping[str, Any], level: int) -> Iterator[bytes]:
    if not value:
        yield b"{}"
        return
    inner = b"\n" + b"  " * (level + 1)
    for n, (key, item) in enumerate(value.items()):
        yield (b"{" if n == 0 else b",") + inner + _encoded(str(key), 0) + b": "
        yield from _pieces(item, level + 1)
    yield b"\n" + b"  " * level + b"}"


def _array(items: Iterator[Any], level: int) -> Iterator[bytes]:
    inner = b"\n" + b"  " * (level + 1)
    empty = True
    for item in items:
        yield (b"[" if empty else b",") + inner
        yield from _pieces(item, level + 1)
        empty = False
    yield b"[]" if empty else b"\n" + b"  " * level + b"]"


def _encoded(value: Any, level: int) -> bytes:
    """One value (no iterator in it) as indented JSON, its lines indented to ``level``."""
    try:
        data = orjson.dumps(value, default=str, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: what only json writes
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        data = text.encode(
            "utf-8", "backslashreplace"
        )  # a lone surrogate must not make it unwritable
    # A newline is only ever between lines: inside a string JSON writes it as \n.
    return data.replace(b"\n", b"\n" + b"  " * level) if level else data
