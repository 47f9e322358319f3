"""Plain sentences for pydantic's validation errors, shared by the job parser and the settings."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["did_you_mean", "sentence", "short", "show"]

# What a value must be, for pydantic's type errors; each reads after "must be ".
_EXPECTED = {
    "string_type": "a string",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "path_type": "a path",
}

_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def short(text: str, limit: int = 100) -> str:
    """``text``, cut at ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else f"{text[:limit]}…"


def show(value: Any) -> str:
    """A given value, as the user wrote it in JSON, shortened: for error messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return short(json.dumps(value, ensure_ascii=True), 60)


def sentence(error: Any, shown: Callable[[Any], str] = show) -> str:
    """One pydantic error as a sentence that reads after "field 'x': " (``shown`` writes the value)."""
    kind, given, ctx = error["type"], error["input"], error.get("ctx", {})
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}, not {shown(given)}"
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        bound = ctx[key]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {words} {bound}, not {shown(given)}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, not {shown(given)}"
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    if kind == "string_too_long":
        return f"is {len(given)} characters long, more than the limit of {ctx['max_length']}"
    if kind == "too_long":
        return f"has {ctx['actual_length']} items, more than the limit of {ctx['max_length']}"
    if kind == "missing":
        return "is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """A hint for an unknown key: the closest known one, or the list of known keys."""
    known = list(known)
    close = difflib.get_close_matches(name[:200], known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
