"""Strict JSON for job files: UTF-8 only, no duplicate keys, no NaN, bounded numbers and nesting.

A job file is read by a daemon that many producers share, so reading it must cost
time linear in its size whatever it holds, and refuse what Python's ``json`` would
accept but another reader might read differently (duplicate keys, lone surrogates,
``NaN``, numbers too long to be finite).
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any

from flowsubmit._wording import short
from flowsubmit.errors import JobRejected

__all__ = ["MAX_DIGITS", "MAX_NESTING", "json_type", "load_json"]

#: JSON nesting deeper than this is refused before parsing (a parser bomb costs nothing).
MAX_NESTING = 32

#: Integers longer than this are refused (Python's own int-from-text limit is 4300 digits).
MAX_DIGITS = 4300

_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")
_BRACKET_OR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def load_json(data: bytes) -> Any:
    """The document in a job file's bytes, read as strict JSON.

    Raises:
        JobRejected: what is wrong with the bytes, first problem only.
    """
    text = _decode(data)
    if not text.strip():
        raise JobRejected("the file is empty" if not data else "the file holds only whitespace")
    too_deep = JobRejected(f"JSON nesting is more than {MAX_NESTING} levels deep (the limit)")
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
            parse_int=_integer,
            parse_float=_finite_float,
        )
    except RecursionError:
        raise too_deep from None  # the parser's own guard, far past the limit
    except json.JSONDecodeError as exc:
        if _nesting_before(text, exc.pos) > MAX_NESTING:
            raise too_deep from None  # say what went wrong first: the nesting, not what followed
        what = (
            "unexpected data after the end of the JSON value"
            if exc.msg == "Extra data"
            else exc.msg
        )
        raise JobRejected(
            f"not valid JSON: {what} at line {exc.lineno} column {exc.colno}"
        ) from None
    if _deeper_than(document, MAX_NESTING):
        raise too_deep
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(document, ())
    return document


def _decode(data: bytes) -> str:
    for bom, encoding in _OTHER_BOMS:
        if data.startswith(bom):
            raise JobRejected(
                f"the file is {encoding} (it starts with a {encoding} byte order mark)",
                hint="save it as UTF-8",
            )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobRejected(
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint="save it as UTF-8",
        ) from None


def _nesting_before(text: str, end: int) -> int:
    """The deepest nesting of brackets in ``text[:end]``, strings skipped; stops past ``MAX_NESTING``.

    Token by token in Python, for the same reason as ``_deeper_than``: a file that is
    not JSON is measured without holding the interpreter lock for the whole file.
    """
    depth = deepest = 0
    for match in _BRACKET_OR_STRING.finditer(text, 0, end):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                break
        elif token in "]}":
            depth -= 1
    return deepest


def _deeper_than(document: Any, limit: int) -> bool:
    """True when objects and arrays nest deeper than ``limit``; found in one pass, without recursion.

    A walk in Python rather than one pass of a regular expression over the text: the
    daemon judges files in threads, and one long C call would hold the interpreter
    lock, and the event loop with it, for the whole file.
    """
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if not isinstance(value, dict | list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise JobRejected("appears twice in the same JSON object", field=short(key))
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise JobRejected(
        f"{name} is not valid JSON", hint="JSON has no NaN or Infinity: use null or a number"
    )


def _integer(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise JobRejected(
            f"a number with {len(text)} digits is too long (the limit is {MAX_DIGITS} digits)"
        )
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JobRejected(f"the number {short(text, 40)} is too large to be represented")
    return value


def _refuse_lone_surrogates(value: Any, path: tuple[str, ...]) -> None:
    """Refuse strings holding half of a UTF-16 pair (``"\\ud800"``): they cannot be written out as UTF-8."""
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, (*path, str(i)))
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, (*path, "<key>"))
            _refuse_lone_surrogates(item, (*path, key))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field = short(".".join(path).encode("utf-8", "backslashreplace").decode()) or None
        raise JobRejected(
            "holds a lone UTF-16 surrogate escape (such as \\ud800), which is not text",
            field=field,
        ) from None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``object``, ``array``, ...)."""
    names = {
        dict: "object",
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
