"""Masks values whose names look like secrets before they reach a log line or a result file."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MASK", "holds_secret", "is_secret_name", "mentions_secret", "redact", "redact_text"]

MASK = "***"

# Matched against whole words of a snake/kebab/camel name, so that `api_key`,
# `db-password` and `authToken` are masked while `keyboard` and `monkey` are not.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "token",
        "secret",
        "key",
        "apikey",
        "auth",
        "credential",
        "credentials",
    }
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


# Cached: every key of every log line is asked (about a dozen a line), and the names in
# use are few: log fields, settings, the parameters of the jobs seen.
@functools.lru_cache(maxsize=4096)
def is_secret_name(name: str) -> bool:
    """True when one word of ``name`` is a secret-like word (password, token, secret, key, ...)."""
    return any(word.lower() in _SECRET_WORDS for word in _WORD.findall(name))


#: Types that hold nothing to mask, told by ``type()`` at once: a log line's values are
#: mostly these, and ``isinstance(value, Mapping)`` (an ABC check) cost half of a line.
_SCALARS = frozenset({str, int, float, bool, type(None)})


def redact(value: Any) -> Any:
    """Return ``value`` with every mapping entry under a secret-like name replaced by ``***``."""
    if type(value) in _SCALARS:
        return value
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_name(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def holds_secret(value: Any) -> bool:
    """Whether ``redact`` would mask anything in ``value``: a log line that holds none is not copied.

    A scalar value is told by its type without a call: a line's values are mostly scalars.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            if is_secret_name(str(key)) or (type(item) not in _SCALARS and holds_secret(item)):
                return True
        return False
    if isinstance(value, list | tuple):
        return any(type(item) not in _SCALARS and holds_secret(item) for item in value)
    return False


#: ``name=value``, ``name: value`` or ``'name': 'value'`` (a dict's repr, JSON) in free text, for
#: masking the value under a secret-like name; a quoted value is masked up to its closing quote.
_ASSIGNMENT = re.compile(
    r"""([A-Za-z][A-Za-z0-9_-]*)(['"]?\s*[=:]\s*)(?:'([^']*)'|"([^"]*)"|(['"]?)[^\s'",;)}\]]+)"""
)


def redact_text(text: str, parameters: Mapping[str, Any] | None = None) -> str:
    """``text`` (a state message, a rejection's reason) with secret values masked: the values of
    secret-like ``parameters`` wherever they appear, and any ``name=value`` under a secret-like name."""
    for value in _secret_values(parameters or {}):
        text = text.replace(value, MASK)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def _mask_assignment(match: re.Match[str]) -> str:
    if not is_secret_name(match[1]):
        return match[0]
    if match[5] is not None:  # unquoted, or a quote never closed
        return f"{match[1]}{match[2]}{match[5]}{MASK}"
    quote = "'" if match[3] is not None else '"'
    return f"{match[1]}{match[2]}{quote}{MASK}{quote}"


def _secret_values(value: Any, secret: bool = False) -> list[str]:
    """The scalar values held under secret-like names, longest first (so none is masked in part)."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            found += _secret_values(v, secret or is_secret_name(str(k)))
    elif isinstance(value, list | tuple):
        for item in value:
            found += _secret_values(item, secret)
    elif secret and value is not None and len(str(value)) >= 3:
        found.append(str(value))
    return sorted(set(found), key=len, reverse=True)


def mentions_secret(path: Iterable[object], value: Any) -> bool:
    """True when a name on ``path`` is secret-like, or ``value`` holds a secret-like key at any depth.

    An error message that would echo such a value must not be shown as is.
    """
    return any(is_secret_name(str(part)) for part in path) or redact(value) != value
