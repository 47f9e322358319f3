"""The one settings object: flags win over ``FLOWSUBMIT_*`` environment variables, which win over the TOML file."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

from flowsubmit._wording import did_you_mean, sentence
from flowsubmit.errors import SettingsError
from flowsubmit.jobs.model import PRIORITY_MAX, PRIORITY_MIN
from flowsubmit.jobs.policy import Policy, ProducerLimits, ProducerRule

__all__ = ["Settings", "crash_point", "example_toml"]


class Settings(BaseSettings):
    """Every knob of the daemon and the library, resolved once at the edge.

    Prefect itself is configured the Prefect way (``PREFECT_API_URL``,
    ``PREFECT_API_KEY``); nothing here duplicates it.
    """

    model_config = SettingsConfigDict(env_prefix="FLOWSUBMIT_", extra="forbid", frozen=True)

    queue: Path | None = Field(
        default=None, description="The queue directory (tmp/, incoming/, processing/, ...)."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description=(
            "`json`: one JSON object per line; `console`: short lines for people; `auto`: "
            "`console` when stdout is a terminal, else `json` (systemd, containers, pipes)."
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written to stdout."
    )
    run_tag: str = Field(
        default="flowsubmit",
        min_length=1,
        description="Tag put on every run flowsubmit creates; the one event subscription filters on it.",
    )
    max_concurrent_jobs: int = Field(default=8, ge=1, description="Jobs the daemon runs at once.")
    max_inflight_submissions: int = Field(
        default=2,
        ge=1,
        description=(
            "Create calls in flight to Prefect at once, over all jobs. 2 was the fastest against "
            "the SQLite-backed server (more in flight only adds 503 'database is locked')."
        ),
    )
    submit_batch_size: int = Field(
        default=100,
        ge=1,
        le=100,
        description=(
            "Most runs created per call to Prefect's bulk route (its limit is 100); fewer while "
            "the server creates slowly, so that one call lasts about a second (docs/performance.md)."
        ),
    )
    poll_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="Polling period while the event stream is down (one batched read per period).",
    )
    reconcile_interval_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "While the event stream is up: the longest period of the count of ended runs that "
            "catches what the stream lost, and of one slice of the rolling read of pending runs "
            "(each is read once per 30 periods)."
        ),
    )
    resubscribe_max_backoff_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait between two attempts to reopen the event stream.",
    )
    rescan_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="Full scan of incoming/ at this period (inotify events are only hints).",
    )
    settle_s: float = Field(
        default=0.5,
        ge=0,
        description="A file written straight into incoming/ is judged only once unchanged this long.",
    )
    drain_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="On SIGTERM, time allowed to finish journal writes and renames.",
    )
    prefect_outage_tolerance_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long submissions and tracking wait for an unreachable Prefect before the job fails.",
    )
    max_job_bytes: int = Field(
        default=1024 * 1024, ge=1, description="Job files larger than this are rejected unread."
    )
    max_runs_per_job: int = Field(
        default=10_000,
        ge=1,
        description="Jobs that expand to more runs are rejected before expanding.",
    )
    force_polling: bool = Field(
        default=False,
        description="Watch incoming/ by polling instead of inotify (NFS, some bind mounts).",
    )
    # The queue is a privilege boundary: what a job may ask for is the daemon's choice.
    allowed_deployments: list[str] = Field(
        default=["*"],
        description=(
            "Glob patterns of `flow/deployment` names a job may run (`*` also matches `/`). "
            'The default ["*"] lets the queue launch any deployment (a warning at start-up).'
        ),
    )
    allowed_job_variables: list[str] = Field(
        default=[],
        description="`job_variables` keys a job may set; by default none (a job setting any is rejected).",
    )
    allow_prefect_kinds: bool = Field(
        default=False,
        description=(
            "Let job parameters hold `__prefect_kind` objects, which Prefect's server fills in "
            "when it creates a run (a Prefect variable's value, a Jinja template); refused by default."
        ),
    )
    # Per-producer limits: each applies to every producer alone; a [[producers]] rule narrows it.
    producer_max_running_jobs: int | None = Field(
        default=None,
        ge=1,
        examples=[4],
        description="Jobs of one producer the daemon runs at once (no limit when unset).",
    )
    producer_max_runs_in_flight: int | None = Field(
        default=None,
        ge=1,
        examples=[500],
        description="Runs of one producer's jobs created and not yet final, at once (no limit when unset).",
    )
    producer_max_priority: int | None = Field(
        default=None,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        examples=[10],
        description="Highest job `priority` a producer may ask for; a job above it is rejected (no limit when unset).",
    )
    producer_max_timeout_s: float | None = Field(
        default=None,
        gt=0,
        examples=[86400],
        description=(
            "Longest job `timeout` a producer may ask for; a job above it is rejected, a job "
            "with none gets producer_default_timeout_s or this (no limit when unset)."
        ),
    )
    producer_default_timeout_s: float | None = Field(
        default=None,
        gt=0,
        examples=[3600],
        description="`timeout` of a job that gives none, never above producer_max_timeout_s (none when unset).",
    )
    producers: list[ProducerRule] = Field(
        default=[],
        description=(
            "[[producers]] rules: by `user`, `uid` or `group` of the job file's owner, their own "
            "`allowed_deployments` / `allowed_job_variables` and limits (`max_running_jobs`, "
            "`max_runs_in_flight`, `max_priority`, `max_timeout_s`, `default_timeout_s`), which "
            "narrow (never widen) the global ones. TOML, or JSON in FLOWSUBMIT_PRODUCERS; no flag."
        ),
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        examples=[9464],
        description="Serve Prometheus /metrics and /healthz on this port (off when unset).",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the metrics port listens on (0.0.0.0 to scrape from other hosts).",
    )
    prefect_events: bool = Field(
        default=True,
        description=(
            "Send each job's flowsubmit.job.* events (claimed, completed, failed, cancelled, "
            "timed_out) to Prefect's event feed, for automations."
        ),
    )
    prefect_artifacts: bool = Field(
        default=False,
        description=(
            "Create a Markdown artifact flowsubmit-<job id> in Prefect when a job ends: its "
            "summary and each run that did not succeed, with its message."
        ),
    )
    retention_days: float | None = Field(
        default=None,
        gt=0,
        examples=[30],
        description=(
            "Delete finished and rejected jobs' files this many days after they ended (hourly); "
            "off when unset. Never touches incoming/ or processing/."
        ),
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init) > environment > TOML file; no dotenv, no secrets dir."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def policy(self) -> Policy:
        """The policy these settings describe: what jobs may ask for, and each producer's limits."""
        return Policy(
            tuple(self.allowed_deployments),
            tuple(self.allowed_job_variables),
            tuple(self.producers),
            allow_prefect_kinds=self.allow_prefect_kinds,
            limits=ProducerLimits(
                max_running_jobs=self.producer_max_running_jobs,
                max_runs_in_flight=self.producer_max_runs_in_flight,
                max_priority=self.producer_max_priority,
                max_timeout_s=self.producer_max_timeout_s,
                default_timeout_s=self.producer_default_timeout_s,
            ),
        )

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Self:
        """Resolve the settings; ``flags`` left at ``None`` do not override anything.

        Raises:
            SettingsError: the only exception: a value is invalid (naming its source,
                flag, variable or file and key, the value and what is allowed), a key
                of the file is unknown, or the file cannot be read as TOML.
        """
        given = {name: value for name, value in flags.items() if value is not None}
        try:
            if config_file is None:
                return cls(**given)
            _check_readable(config_file)
            config = SettingsConfigDict(**{**cls.model_config, "toml_file": config_file})
            bound = type(cls.__name__, (cls,), {"model_config": config})
            return bound(**given)  # type: ignore[no-any-return]
        except ValidationError as exc:
            raise _settings_error(exc.errors()[0], given, config_file) from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(str(config_file), f"not valid TOML: {exc}") from None
        except SourceError as exc:  # a list variable that is not JSON
            raise _unparsed_variable(str(exc)) from None


def _check_readable(config_file: Path) -> None:
    """Refuse a ``--config`` that is missing, a directory or unreadable, before pydantic opens it."""
    source = f"--config {config_file}"
    try:
        with config_file.open("rb"):
            pass
    except FileNotFoundError:
        raise SettingsError(source, "no such file") from None
    except IsADirectoryError:
        raise SettingsError(source, "is a directory, not a TOML file") from None
    except PermissionError:
        raise SettingsError(source, "permission denied") from None


#: The settings that are lists, what they list and an example: one sentence for a value
#: of the wrong shape, whichever source it came from (the environment's is JSON).
_LISTS = {
    "allowed_deployments": ("globs", '["etl/*"]'),
    "allowed_job_variables": ("keys", '["image"]'),
    "producers": ("rules", '[{"user": "alice", "allowed_deployments": ["etl/*"]}]'),
}


def _list_sentence(key: str, *, json_text: bool) -> str:
    what, example = _LISTS[key]
    if json_text:
        return f"must be a JSON list of {what}, e.g. '{example}'"
    if key == "producers":
        return "must be [[producers]] tables (see config/flowsubmit.toml)"
    return f"must be a list of {what}, e.g. {key} = {example}"


def _unparsed_variable(message: str) -> SettingsError:
    """pydantic-settings' error for a list variable that is not JSON, as a ``SettingsError``."""
    match = re.search(r'field "(\w+)"', message)
    key = match.group(1) if match else ""
    if key not in _LISTS:
        return SettingsError("FLOWSUBMIT_*", message)
    return SettingsError(f"FLOWSUBMIT_{key.upper()}", _list_sentence(key, json_text=True))


def _settings_error(error: Any, given: dict[str, Any], config_file: Path | None) -> SettingsError:
    """One pydantic error as a ``SettingsError`` naming the source the value came from.

    Sources are tried in precedence order: a flag given wins over the variable, which
    wins over the file, so the first that holds the key is the one pydantic judged.
    """
    key = str(error["loc"][0]) if error["loc"] else ""
    variable = f"FLOWSUBMIT_{key.upper()}"
    if error["type"] == "extra_forbidden":
        where = f"{config_file}: {key}" if key not in given and config_file else key
        return SettingsError(
            where, "unknown setting", hint=did_you_mean(key, Settings.model_fields)
        )
    if key in given:
        return SettingsError(f"--{key.replace('_', '-')}", sentence(error, repr))
    in_env = any(name.upper() == variable for name in os.environ)
    if key in _LISTS and len(error["loc"]) <= 2 and error["type"] in ("list_type", "string_type"):
        # The list itself, or one of its items, is not what the setting lists.
        where = variable if in_env else f"{config_file}: {key}"
        return SettingsError(where, _list_sentence(key, json_text=in_env))
    if in_env:
        return SettingsError(variable, sentence(error, repr))
    path = ".".join(str(part) for part in error["loc"])  # [[producers]] errors sit deeper
    return SettingsError(f"{config_file}: {path}", sentence(error))


def crash_point() -> str | None:
    """The hidden, test-only setting ``FLOWSUBMIT_TEST_CRASH_AT`` (``POINT`` or ``POINT:N``).

    When set, the daemon kills itself with SIGKILL at that point (see ``faults.POINTS`` and
    docs/operations.md). It is not a ``Settings`` field on purpose: no flag, no TOML key,
    nothing in ``--help``; only the crash tests set it.
    """
    return os.environ.get("FLOWSUBMIT_TEST_CRASH_AT") or None


def example_toml() -> str:
    """``config/flowsubmit.toml``: every setting with its description and default."""
    lines = [
        "# flowsubmit settings. Every key is optional; shown here with its default.",
        "# Precedence: command-line flags > FLOWSUBMIT_<NAME> environment variables > this file.",
        "# Prefect is configured the Prefect way (PREFECT_API_URL, PREFECT_API_KEY), not here.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        if name == "producers":
            continue  # TOML tables: every key after them would belong to them, so they go last
        lines.append(f"# {field.description}")
        if field.default is None:
            example = field.examples[0] if field.examples else "/var/spool/flowsubmit"
            lines.append(f"# {name} = {_toml_value(example)}")
        else:
            lines.append(f"{name} = {_toml_value(field.default)}")
        lines.append("")
    producers = Settings.model_fields["producers"].description
    return "\n".join([*lines, f"# {producers}", *_PRODUCERS_EXAMPLE, ""])


_PRODUCERS_EXAMPLE = (
    "# [[producers]]",
    '# user = "etl-cron"',
    '# allowed_deployments = ["etl/*"]',
    "# allowed_job_variables = []",
    "# max_running_jobs = 2",
    "# max_runs_in_flight = 200",
    "# max_priority = 0",
    "# max_timeout_s = 7200",
    "# default_timeout_s = 3600",
)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return json.dumps(value)  # a list of plain strings is the same in JSON and TOML
    return repr(value)
