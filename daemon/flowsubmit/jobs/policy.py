"""The queue's privilege boundary: who dropped a job (its file's owner) and what that producer may ask for.

A job file's owner is set by the kernel when the file is created and a ``rename``
keeps it, so the producer of a job is the user who *created* its file, whoever
moved it into ``incoming/`` afterwards. The policy is the daemon's:
``allowed_deployments`` (glob patterns of ``flow/deployment``),
``allowed_job_variables`` (keys), and ``[[producers]]`` rules that narrow both for
the producers they match, and per-producer limits (jobs and runs at once, the
highest ``priority``, the longest ``timeout``). Tags starting with ``flowsubmit-``
are flowsubmit's own, whatever the settings (compared in a normalised form, so a
look-alike is refused too); parameters may not ask Prefect to fill values in on the
server (``__prefect_kind``) unless ``allow_prefect_kinds`` says so.
"""

from __future__ import annotations

import grp
import os
import pwd
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowsubmit._wording import short, show
from flowsubmit.errors import JobRejected
from flowsubmit.jobs.model import PRIORITY_MAX, PRIORITY_MIN, capped

if TYPE_CHECKING:
    from flowsubmit.jobs.model import Job

__all__ = [
    "PREFECT_KIND_KEY",
    "RESERVED_TAG_PREFIX",
    "Policy",
    "Producer",
    "ProducerLimits",
    "ProducerRule",
    "current_producer",
    "hydration_problems",
    "is_reserved_tag",
    "normalised_tag",
    "producer_of",
    "reserved_tag_problems",
]

#: Tags with this prefix mark runs for flowsubmit itself (job, producer): a job may not set them.
RESERVED_TAG_PREFIX = "flowsubmit-"

#: A parameter object holding this key is filled in by Prefect's server when the run is
#: created (a Prefect variable's value, a rendered Jinja template): behind the policy's back.
PREFECT_KIND_KEY = "__prefect_kind"

_KINDS_HINT = (
    "give the value itself; the daemon's setting allow_prefect_kinds lets Prefect fill it in"
)


@dataclass(frozen=True, slots=True)
class Producer:
    """Who dropped a job: the owner of its file, named where the user database knows the uid."""

    uid: int
    user: str | None = None
    #: The user's primary group id (None when the uid has no entry): for ``group`` rules.
    gid: int | None = None

    @property
    def name(self) -> str:
        """The user name, or the uid as text when it does not resolve."""
        return self.user if self.user is not None else str(self.uid)

    @property
    def tag(self) -> str:
        """The run tag ``flowsubmit-producer:<user>`` (the uid when there is no name)."""
        return f"{RESERVED_TAG_PREFIX}producer:{self.name}"

    def as_dict(self) -> dict[str, Any]:
        """``{"uid": 1001, "user": "etl-cron"}``: the ``producer`` of ``job.claimed`` and the result."""
        return {"uid": self.uid, "user": self.user}

    def in_group(self, group: str) -> bool:
        """True when the user's primary group is ``group`` or the user is listed as its member.

        Membership is read from the group database at each check (not cached), so a
        change to it applies to the next job without restarting the daemon.
        """
        try:
            entry = grp.getgrnam(group)
        except KeyError:
            return False
        return self.gid == entry.gr_gid or (self.user is not None and self.user in entry.gr_mem)


def producer_of(st: os.stat_result) -> Producer:
    """The producer of a job file, from its ``stat``: the file's owner."""
    return _producer(st.st_uid)


def current_producer() -> Producer:
    """This process as a producer: ``enqueue`` runs as the user whose file it creates."""
    return _producer(os.geteuid())


def _producer(uid: int) -> Producer:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return Producer(uid)
    return Producer(uid, entry.pw_name, entry.pw_gid)


class ProducerRule(BaseModel):
    """One ``[[producers]]`` table: which producers it matches and the narrower lists it imposes.

    A list left out leaves that part of the policy as the global setting; a rule can
    only narrow, because a job must pass the global policy *and* every rule that
    matches its producer.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str | None = Field(default=None, min_length=1, description="Matches this user name.")
    uid: int | None = Field(default=None, ge=0, description="Matches this numeric user id.")
    group: str | None = Field(
        default=None, min_length=1, description="Matches members of this group (primary or listed)."
    )
    allowed_deployments: list[str] | None = Field(
        default=None, description="Glob patterns of `flow/deployment` these producers may run."
    )
    allowed_job_variables: list[str] | None = Field(
        default=None, description="`job_variables` keys these producers may set."
    )
    max_running_jobs: int | None = Field(
        default=None, ge=1, description="Jobs of these producers the daemon runs at once."
    )
    max_runs_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Runs of these producers' jobs created and not yet final, at once.",
    )
    max_priority: int | None = Field(
        default=None,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="Highest `priority` these producers' jobs may ask for.",
    )
    max_timeout_s: float | None = Field(
        default=None, gt=0, description="Longest `timeout` these producers' jobs may ask for."
    )
    default_timeout_s: float | None = Field(
        default=None, gt=0, description="`timeout` of these producers' jobs that give none."
    )

    @model_validator(mode="after")
    def _one_matcher(self) -> Self:
        given = [name for name in ("user", "uid", "group") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a [[producers]] rule names exactly one of user, uid or group"
                + (f" (this one gives {', '.join(given)})" if given else "")
            )
        return self

    @property
    def label(self) -> str:
        """The rule's producer, as it reads in an error: ``user etl-cron``, ``uid 1001``, ``group etl``."""
        if self.user is not None:
            return f"user {self.user}"
        if self.uid is not None:
            return f"uid {self.uid}"
        return f"group {self.group}"

    def matches(self, producer: Producer) -> bool:
        """True when this rule applies to ``producer``."""
        if self.user is not None:
            return producer.user == self.user
        if self.uid is not None:
            return producer.uid == self.uid
        return self.group is not None and producer.in_group(self.group)


@dataclass(frozen=True, slots=True)
class _Limits:
    """One set of limits a job must satisfy: the global settings, or one producer rule."""

    #: ``for user etl-cron`` for a rule; empty for the global settings.
    who: str
    deployments: tuple[str, ...] | None
    job_variables: tuple[str, ...] | None
    #: The names of the settings below where they come from: ``producer_`` for the global ones.
    prefix: str = ""
    max_priority: int | None = None
    max_timeout_s: float | None = None

    def deployment_problem(self, field: str, name: str) -> JobRejected | None:
        if self.deployments is None or any(fnmatchcase(name, p) for p in self.deployments):
            return None
        return _refusal(field, name, self.who, "allowed_deployments", self.deployments)

    def job_variable_problem(self, field: str, key: str) -> JobRejected | None:
        if self.job_variables is None or key in self.job_variables:
            return None
        return _refusal(field, key, self.who, "allowed_job_variables", self.job_variables)

    def priority_problem(self, priority: int) -> JobRejected | None:
        if self.max_priority is None or priority <= self.max_priority:
            return None
        return self._above("priority", priority, "max_priority", self.max_priority)

    def timeout_problem(self, timeout: float | None) -> JobRejected | None:
        if self.max_timeout_s is None or timeout is None or timeout <= self.max_timeout_s:
            return None
        return self._above("timeout", timeout, "max_timeout_s", self.max_timeout_s)

    def _above(self, field: str, value: float, setting: str, limit: float) -> JobRejected:
        return JobRejected(
            f"must be at most {_number(limit)}{self.who}, not {_number(value)}",
            field=field,
            hint=f"{self.prefix}{setting}: {_number(limit)}",
        )


def _number(value: float) -> str:
    """``3600`` for 3600.0: a limit or a value as a job file would write it."""
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True, slots=True)
class ProducerLimits:
    """What one producer may use at once, and the timeout its jobs get when they give none.

    ``None`` is no limit. Built by ``Policy.limits_for``: the smallest of the global
    settings and every rule matching the producer.
    """

    max_running_jobs: int | None = None
    max_runs_in_flight: int | None = None
    max_priority: int | None = None
    max_timeout_s: float | None = None
    #: Never above ``max_timeout_s``; a job with no ``timeout`` gets this, else ``max_timeout_s``.
    default_timeout_s: float | None = None

    @property
    def job_timeout_s(self) -> float | None:
        """The timeout a job that gives none runs with: the default, else the maximum, else none."""
        return self.default_timeout_s if self.default_timeout_s is not None else self.max_timeout_s


def _refusal(field: str, value: str, who: str, setting: str, allowed: Sequence[str]) -> JobRejected:
    listed = ", ".join(allowed) if allowed else "none"
    return JobRejected(f'"{value}" is not allowed{who}', field=field, hint=f"{setting}: {listed}")


@dataclass(frozen=True, slots=True)
class Policy:
    """The daemon's policy, built once from the settings; ``check`` judges one job for one producer."""

    allowed_deployments: tuple[str, ...] = ("*",)
    allowed_job_variables: tuple[str, ...] = ()
    producers: tuple[ProducerRule, ...] = ()
    #: Let parameters hold ``__prefect_kind`` objects, which Prefect's server fills in.
    allow_prefect_kinds: bool = False
    #: The limits of every producer (the ``producer_*`` settings); a matching rule narrows them.
    limits: ProducerLimits = ProducerLimits()

    def limits_for(self, producer: Producer) -> ProducerLimits:
        """``producer``'s limits: the smallest of the global one and every matching rule's.

        The default timeout is the smallest given, and never above the maximum.
        """
        sources = [self.limits, *(r for r in self.producers if r.matches(producer))]

        def smallest(name: str) -> Any:
            return min((v for s in sources if (v := getattr(s, name)) is not None), default=None)

        max_timeout_s, default_timeout_s = smallest("max_timeout_s"), smallest("default_timeout_s")
        if default_timeout_s is not None and max_timeout_s is not None:
            default_timeout_s = min(default_timeout_s, max_timeout_s)
        return ProducerLimits(
            max_running_jobs=smallest("max_running_jobs"),
            max_runs_in_flight=smallest("max_runs_in_flight"),
            max_priority=smallest("max_priority"),
            max_timeout_s=max_timeout_s,
            default_timeout_s=default_timeout_s,
        )

    @property
    def launches_anything(self) -> bool:
        """True when the global patterns let a producer no rule matches launch any deployment."""
        return any(pattern in ("*", "*/*") for pattern in self.allowed_deployments)

    def check(self, job: Job, producer: Producer) -> None:
        """Accept ``job`` from ``producer``, or raise naming the first field and the rule it breaks.

        Raises:
            JobRejected: a reserved tag, a ``__prefect_kind``, a deployment, a job variable,
                a priority or a timeout outside policy.
        """
        problems = self.problems(job, producer)
        if problems:
            raise problems[0]

    def problems(self, job: Job, producer: Producer) -> list[JobRejected]:
        """How ``job`` breaks the policy for ``producer`` (reserved tags and
        ``__prefect_kind``, then deployments, job variables, priority and timeout; the
        global settings before the rules; capped as ``check_job`` caps its problems);
        empty when it is accepted.

        Every stage is checked as it will run: its own deployment or the job's, and
        the job's ``job_variables`` merged with the stage's. A job without a ``timeout``
        is not refused: it runs with the producer's default (``limits_for``).
        """
        limits = [self._global(), *(self._rule(r) for r in self.producers if r.matches(producer))]
        deployments = list(_deployments(job))
        variables = list(_job_variables(job))
        found: list[JobRejected | None] = [*_reserved_problems(job, self.allow_prefect_kinds)]
        for rule in limits:
            found += [rule.deployment_problem(field, name) for field, name in deployments]
        for rule in limits:
            found += [rule.job_variable_problem(field, key) for field, key in variables]
        found += [rule.priority_problem(job.priority) for rule in limits]
        found += [rule.timeout_problem(job.timeout) for rule in limits]
        return capped([problem for problem in found if problem is not None])

    def _global(self) -> _Limits:
        return _Limits(
            "",
            self.allowed_deployments,
            self.allowed_job_variables,
            "producer_",
            self.limits.max_priority,
            self.limits.max_timeout_s,
        )

    @staticmethod
    def _rule(rule: ProducerRule) -> _Limits:
        return _Limits(
            f" for {rule.label}",
            None if rule.allowed_deployments is None else tuple(rule.allowed_deployments),
            None if rule.allowed_job_variables is None else tuple(rule.allowed_job_variables),
            "",
            rule.max_priority,
            rule.max_timeout_s,
        )


def reserved_tag_problems(job: Job, *, allow_prefect_kinds: bool = False) -> list[JobRejected]:
    """What a job may never set, whatever the lists of the policy: one refusal per reserved tag
    it sets anywhere (job, stage or run), then, unless ``allow_prefect_kinds``, per
    ``__prefect_kind`` in its parameters (``hydration_problems``).

    ``flowsubmit validate`` without ``--policy`` judges a job by this alone, with
    ``__prefect_kind`` refused as the default setting does.
    """
    return capped(_reserved_problems(job, allow_prefect_kinds))


def _reserved_problems(job: Job, allow_prefect_kinds: bool) -> list[JobRejected]:
    tags = [
        JobRejected(
            f"{show(tag)} is a reserved tag",
            field=field,
            hint=f"tags starting with {RESERVED_TAG_PREFIX!r} are set by flowsubmit itself"
            + ("" if tag.startswith(RESERVED_TAG_PREFIX) else ", and this one reads as one"),
        )
        for field, tag in _tags(job)
        if is_reserved_tag(tag)
    ]
    return tags if allow_prefect_kinds else [*tags, *hydration_problems(job)]


def normalised_tag(tag: str) -> str:
    """``tag`` as it reads: NFKC, case-folded, without whitespace or format characters, dashes as '-'.

    Prefect shows tags as given, so ``Flowsubmit-producer:x``, a U+2010 hyphen, a
    zero-width space or fullwidth letters would pass for flowsubmit's own tags.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", tag).casefold())
    return "".join(_normalised_character(char) for char in folded)


def _normalised_character(char: str) -> str:
    category = unicodedata.category(char)
    if char.isspace() or category == "Cf":
        return ""
    return "-" if category == "Pd" else char


def is_reserved_tag(tag: str) -> bool:
    """True when ``tag`` is, or reads as, one of flowsubmit's own (``flowsubmit-*``)."""
    return normalised_tag(tag).startswith(RESERVED_TAG_PREFIX)


def hydration_problems(job: Job) -> list[JobRejected]:
    """One refusal per ``__prefect_kind`` key at any depth of the job's parameters (job,
    stage and run ``parameters``, and the values of ``matrix``): the job's, then each stage's."""
    return [
        JobRejected(
            f"asks Prefect to fill in a value on the server ({PREFECT_KIND_KEY}: {show(kind)}),"
            " which the daemon's policy does not allow",
            field=short(field),
            hint=_KINDS_HINT,
        )
        for where, value in _parameter_values(job)
        for field, kind in _prefect_kinds(value, where)
    ] + [
        JobRejected(
            f"asks Prefect to fill in a value on the worker ({show(found)}), which the daemon's"
            " policy does not allow",
            field=short(field),
            hint=_KINDS_HINT,
        )
        for where, variables in _job_variable_values(job)
        for field, found in _templates(variables, where)
    ]


def _deployments(job: Job) -> Iterator[tuple[str, str]]:
    """(field, deployment) of every stage as it will run; a job-level one every stage overrides is never run."""
    if job.stages is None:
        yield "deployment", job.deployment
        return
    for i, stage in enumerate(job.stages):
        if stage.deployment:
            yield f"stages.{i}.deployment", stage.deployment
        else:
            yield "deployment", job.deployment


def _job_variables(job: Job) -> Iterator[tuple[str, str]]:
    """(field, key) of every job variable set, at the job level (merged into every stage) and per stage."""
    for key in job.job_variables:
        yield f"job_variables.{key}", key
    for i, stage in enumerate(job.stages or ()):
        for key in stage.job_variables:
            yield f"stages.{i}.job_variables.{key}", key


def _job_variable_values(job: Job) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, job_variables) of the job and of each stage."""
    yield "job_variables", job.job_variables
    for i, stage in enumerate(job.stages or ()):
        yield f"stages.{i}.job_variables", stage.job_variables


def _templates(value: Any, field: str) -> Iterator[tuple[str, str]]:
    """(field, text) of what a worker resolves in job variables: ``{{ prefect.variables.x }}``-style
    templates in strings and ``$ref`` block references, depth first in order."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield f"{field}.{key}", key
            yield from _templates(item, f"{field}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _templates(item, f"{field}.{i}")
    elif isinstance(value, str) and "{{" in value:
        yield field, value


def _parameter_values(job: Job) -> Iterator[tuple[str, Any]]:
    """(field, value) of everything that becomes a run's parameters: defaults, runs and matrix lists."""
    stages = [("", job), *((f"stages.{i}.", stage) for i, stage in enumerate(job.stages or ()))]
    for prefix, stage in stages:
        yield f"{prefix}parameters", stage.parameters
        for r, run in enumerate(stage.runs):
            yield f"{prefix}runs.{r}.parameters", run.parameters
        for key, values in stage.matrix.items():
            yield f"{prefix}matrix.{key}", values


def _prefect_kinds(value: Any, field: str) -> Iterator[tuple[str, Any]]:
    """(field, kind) of every ``__prefect_kind`` key inside ``value``, depth first in order."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == PREFECT_KIND_KEY:
                yield f"{field}.{key}", item
            yield from _prefect_kinds(item, f"{field}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _prefect_kinds(item, f"{field}.{i}")


def _tags(job: Job) -> Iterator[tuple[str, str]]:
    """(field, tag) of every tag a job sets: its own, its runs', its stages' and their runs'."""
    stages = [("", job), *((f"stages.{i}.", stage) for i, stage in enumerate(job.stages or ()))]
    for prefix, stage in stages:
        for i, tag in enumerate(stage.tags):
            yield f"{prefix}tags.{i}", tag
        for r, run in enumerate(stage.runs):
            for i, tag in enumerate(run.tags):
                yield f"{prefix}runs.{r}.tags.{i}", tag


def producer_by_uid(uid: int) -> Producer:
    """The producer ``uid``, named from the user database (a job's producer as its journal records it)."""
    return _producer(uid)
