"""One builder of the job documents tests hand to the parser, the policy, the queue and the daemon.

Named ``make_job``, not ``job``: tests name their own jobs ``job`` (and counts of them ``jobs``),
and a local of the builder's name would hide it.
"""

from __future__ import annotations

import json
from typing import Any, overload

from flowsubmit.jobs.model import Job

__all__ = ["DEPLOYMENT", "make_job"]

#: The deployment a job names unless told otherwise (tests that never reach a server).
DEPLOYMENT = "etl/etl-deployment"


@overload
def make_job(*, into: type[dict[str, Any]] = dict, **fields: Any) -> dict[str, Any]: ...


@overload
def make_job(*, into: type[bytes], **fields: Any) -> bytes: ...


@overload
def make_job(*, into: type[Job], **fields: Any) -> Job: ...


def make_job(*, into: type[object] = dict, **fields: Any) -> object:
    """A job with ``fields`` in the order given, and ``deployment`` and ``runs`` where a producer writes them.

    ``deployment`` (``DEPLOYMENT`` when not given) comes first, and ``runs`` (one run
    without parameters when not given) right after it. ``runs=N`` is N runs with the
    parameters ``{"table": 0}`` to ``{"table": N - 1}`` (as the test flows take them);
    ``runs=None`` leaves the key out (a job of a matrix or of stages, or of no runs).
    Every other value, of ``runs`` or of any field, is kept as given, bad ones included.

    Args:
        into: ``dict`` (the default), ``bytes`` for the file a producer drops
            (``json.dumps``, UTF-8), or ``Job`` for the validated model.
        **fields: the job's keys, and any key a test wants the parser to see.

    Returns:
        The job as a dict, as the bytes of its file, or as a ``Job``.

    Example: ``make_job(id="a", runs=2)`` is ``{"deployment": DEPLOYMENT, "id": "a",
    "runs": [{"parameters": {"table": 0}}, {"parameters": {"table": 1}}]}``.
    """
    document = _document(fields)
    if into is bytes:
        return json.dumps(document).encode()
    if into is Job:
        return Job.model_validate(document)
    if into is dict:
        return document
    raise TypeError(f"into: dict, bytes or Job, not {into!r}")


def _document(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with the default deployment and runs filled in, and ``runs`` spelled out."""
    if "deployment" not in fields:
        fields = {"deployment": DEPLOYMENT, **fields}
    if "runs" not in fields:
        return _after(fields, "deployment", "runs", [{}])
    runs = fields["runs"]
    if runs is None:
        return {key: value for key, value in fields.items() if key != "runs"}
    if isinstance(runs, int) and not isinstance(runs, bool):
        return {**fields, "runs": [{"parameters": {"table": t}} for t in range(runs)]}
    return fields


def _after(fields: dict[str, Any], anchor: str, key: str, value: object) -> dict[str, Any]:
    """``fields`` with ``key: value`` inserted right after ``anchor``."""
    items = list(fields.items())
    at = list(fields).index(anchor) + 1
    return dict([*items[:at], (key, value), *items[at:]])
