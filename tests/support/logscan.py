"""Finds every structlog event name and key the package logs, by reading its source (for the docs test)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "flowsubmit"
LEVELS = {"debug", "info", "warning", "error", "critical", "exception"}


def logged_events() -> dict[str, set[str]]:
    """``{event name: {keys}}`` for every ``log.<level>("name", key=...)`` call in the package."""
    events: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
            ):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "log"):
                continue
            if not (
                node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                continue
            keys = events.setdefault(node.args[0].value, set())
            keys.update(kw.arg for kw in node.keywords if kw.arg)
    return events


if __name__ == "__main__":
    for name, keys in sorted(logged_events().items()):
        print(name, sorted(keys))
