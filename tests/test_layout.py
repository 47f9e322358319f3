"""The package's rooms and the direction of their imports, read from the source (no import runs).

The map is in ``flowsubmit/__init__.py``: each room may import only the rooms below it,
only ``gateway`` (and ``local``, which starts servers) imports Prefect or httpx, and
only ``logs`` imports structlog.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flowsubmit

PACKAGE = Path(flowsubmit.__file__).parent

#: Each room's rank: a module may import its own room and rooms of a lower rank.
#: Root modules are grouped: the foundation everything uses, the settings, the library.
RANKS = {
    "foundation": 0,  # errors, redaction, _types, _aio, _wording, logs, metrics
    "jobs": 1,
    "settings": 2,
    "queue": 3,
    "gateway": 4,
    "engine": 5,
    "ops": 6,
    "library": 7,  # submission, library_log
    "service": 8,
    "local": 9,
    "cli": 10,
    "package": 11,  # flowsubmit/__init__.py: the library's names, loaded lazily
}
ROOT_ROOMS = {"settings": "settings", "submission": "library", "library_log": "library"}
PREFECT_ROOMS = {"gateway", "local"}


def _room(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts or parts == ["__init__"]:
        return "package"
    if (PACKAGE / parts[0]).is_dir():
        return parts[0]
    return ROOT_ROOMS.get(parts[0], "foundation")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts)
        found[name.removesuffix(".__init__") if path.name == "__init__.py" else name] = ast.parse(
            path.read_text(), str(path)
        )
    return found


def _submodule_or_package(name: str) -> str:
    is_module = (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()
    return f"flowsubmit.{name}" if is_module else "flowsubmit"


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Every module a tree imports, at any depth (lazy imports count), as dotted names."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "flowsubmit":
            # `from flowsubmit import metrics` names a module; `... import GatewayError`, the package
            out += [(node.lineno, _submodule_or_package(alias.name)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


def test_every_module_has_a_room_and_every_room_is_ranked() -> None:
    rooms = {_room(name) for name in _modules()}
    assert rooms <= set(RANKS), rooms - set(RANKS)
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(RANKS), f"rank the new room(s): {subpackages - set(RANKS)}"


def test_imports_point_down() -> None:
    upward = []
    for name, tree in _modules().items():
        here = _room(name)
        for line, target in _imports(tree):
            if target != "flowsubmit" and not target.startswith("flowsubmit."):
                continue
            there = _room(target)
            if there != here and RANKS[there] >= RANKS[here]:
                upward.append(f"{name}:{line} imports {target} ({here} → {there})")
    assert upward == []


def test_only_the_gateway_and_local_servers_import_prefect_or_httpx() -> None:
    found = [
        f"{name}:{line} imports {target}"
        for name, tree in _modules().items()
        if _room(name) not in PREFECT_ROOMS
        for line, target in _imports(tree)
        if target.split(".")[0] in {"prefect", "httpx"}
    ]
    assert found == []


def test_only_logs_uses_structlog() -> None:
    found = [
        f"{name}:{line} imports {target}"
        for name, tree in _modules().items()
        if name != "flowsubmit.logs"
        for line, target in _imports(tree)
        if target.split(".")[0] == "structlog"
    ]
    assert found == []


def test_every_room_says_what_it_owns() -> None:
    for room in RANKS:
        init = PACKAGE / room / "__init__.py"
        if init.exists():
            assert len(ast.get_docstring(ast.parse(init.read_text())) or "") > 80, room
