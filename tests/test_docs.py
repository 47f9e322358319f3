"""Generated and documented artefacts stay in step with the code (no server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flowsubmit.jobs.model import job_schema
from flowsubmit.settings import Settings, example_toml
from tests.support.logscan import logged_events

ROOT = Path(__file__).resolve().parent.parent


def _logs_table() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in (ROOT / "docs" / "logs.md").read_text().splitlines():
        match = re.match(r"\| `([a-z_]+\.[a-z_.]+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def test_every_logged_event_and_key_is_documented() -> None:
    """docs/logs.md has a row for every event the package logs, naming each of its keys."""
    rows = _logs_table()
    missing = {
        event: sorted(key for key in keys if f"`{key}`" not in rows.get(event, ""))
        for event, keys in logged_events().items()
    }
    assert {event: keys for event, keys in missing.items() if event not in rows or keys} == {}


def test_documented_events_exist() -> None:
    """docs/logs.md lists no event the package no longer logs."""
    assert sorted(set(_logs_table()) - set(logged_events())) == []


def test_job_schema_file_is_generated_from_the_model() -> None:
    """config/job.schema.json equals the model's schema (regenerate: flowsubmit schema > config/job.schema.json)."""
    assert json.loads((ROOT / "config" / "job.schema.json").read_text()) == job_schema()


def test_settings_file_lists_every_setting_with_its_default() -> None:
    """config/flowsubmit.toml is the generated example (regenerate: make config) and loads as the defaults."""
    assert (ROOT / "config" / "flowsubmit.toml").read_text() == example_toml()
    assert (
        Settings.load(ROOT / "config" / "flowsubmit.toml").model_dump() == Settings().model_dump()
    )
    assert all(field.description for field in Settings.model_fields.values())


def test_dockerfile_runs_the_daemon_unprivileged_with_the_queue_as_a_volume() -> None:
    """The image pins an exact slim base, runs non-root with a writable PREFECT_HOME, a queue volume, SIGTERM and a health check."""
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1)
        for line in text.splitlines()
        if line and not line.startswith(("#", " "))
    ]
    by_name = {name: rest for name, *rest_list in instructions for rest in rest_list}
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", by_name["FROM"])
    assert "PREFECT_HOME=/var/lib/flowsubmit/prefect" in text
    assert "chown flowsubmit:flowsubmit /var/spool/flowsubmit /var/lib/flowsubmit" in text
    assert by_name["HEALTHCHECK"].startswith("--interval")
    assert '["flowsubmit", "health", "--queue", "/var/spool/flowsubmit"]' in text
    assert by_name["USER"].split(":")[0] not in ("root", "0")
    assert json.loads(by_name["ENTRYPOINT"]) == [
        "flowsubmit",
        "run",
        "--queue",
        "/var/spool/flowsubmit",
    ]
    assert json.loads(by_name["VOLUME"]) == ["/var/spool/flowsubmit"]
    assert by_name["STOPSIGNAL"] == "SIGTERM"


def test_readme_starts_with_the_two_commands() -> None:
    """A new user meets `make demo` and `make test` before anything else."""
    head = (ROOT / "README.md").read_text()[:1500]
    assert "make demo" in head and "make test" in head


def test_the_build_context_leaves_out_the_venv_but_not_what_the_image_copies() -> None:
    """.dockerignore keeps .venv and .git out of the build context, and none of the Dockerfile's COPY sources."""
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = {
        source.rstrip("/")
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    }
    assert {".venv", ".git"} <= ignored
    assert copied and not copied & ignored


def test_the_license_file_is_the_apache_2_text_pyproject_names() -> None:
    """pyproject says Apache-2.0; LICENSE holds that licence's text."""
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
