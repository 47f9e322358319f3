"""A JSON document written as it is encoded: the result file of a 100,000-run job is never whole in memory."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

__all__ = ["json_chunks"]


#: Bytes gathered before a chunk of a JSON document is handed to the file.
_CHUNK_CHARS = 64 * 1024


def json_chunks(value: Any) -> Iterator[bytes]:
    """``value`` as indented JSON and a newline, in chunks; an iterator in it is an array written as it is read.

    The bytes are those of ``json.dumps(value, indent=2, ensure_ascii=False,
    default=str)`` with every iterator made a list: the same encoder, fed lazily.
    """
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False, default=_streamed_or_str)
    pieces: list[str] = []
    size = 0
    for piece in encoder.iterencode(value):
        pieces.append(piece)
        size += len(piece)
        if size >= _CHUNK_CHARS:
            yield _utf8("".join(pieces))
            pieces, size = [], 0
    pieces.append("\n")
    yield _utf8("".join(pieces))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "backslashreplace")  # a lone surrogate must not make it unwritable


def _streamed_or_str(value: Any) -> Any:
    return _StreamedArray(value) if isinstance(value, Iterator) else str(value)


class _StreamedArray(list[Any]):
    """An iterator that the json module encodes as an array while reading it.

    With ``indent``, the json module encodes in Python, and a list there is only
    tested for truth and iterated with ``for``: this list answers both from the
    iterator, so only the item being written exists.
    """

    def __init__(self, items: Iterator[Any]) -> None:
        super().__init__()
        self._head = list(itertools.islice(items, 1))
        self._items = items

    def __bool__(self) -> bool:
        return bool(self._head)

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain(self._head, self._items)
