"""The queue's privilege boundary: who dropped a job (its file's owner) and what that producer may ask for.

A job file's owner is set by the kernel when the file is created and a ``rename``
keeps it, so the producer of a job is the user who *created* its file, whoever
moved it into ``incoming/`` afterwards (#14). The policy is the daemon's:
``allowed_deployments`` (glob patterns of ``flow/deployment``),
``allowed_job_variables`` (keys), and ``[[producers]]`` rules that narrow both for
the producers they match. Tags starting with ``flowsubmit-`` are flowsubmit's
own, whatever the settings.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowsubmit.errors import JobRejected

if TYPE_CHECKING:
    from flowsubmit.jobs import Job
    from flowsubmit.settings import Settings

__all__ = [
    "RESERVED_TAG_PREFIX",
    "Policy",
    "Producer",
    "ProducerRule",
    "reserved_tag_problems",
    "current_producer",
    "producer_of",
]

#: Tags with this prefix mark runs for flowsubmit itself (job, producer): a job may not set them.
RESERVED_TAG_PREFIX = "flowsubmit-"


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

    def deployment_problem(self, field: str, name: str) -> JobRejected | None:
        if self.deployments is None or any(fnmatchcase(name, p) for p in self.deployments):
            return None
        return _refusal(field, name, self.who, "allowed_deployments", self.deployments)

    def job_variable_problem(self, field: str, key: str) -> JobRejected | None:
        if self.job_variables is None or key in self.job_variables:
            return None
        return _refusal(field, key, self.who, "allowed_job_variables", self.job_variables)


def _refusal(field: str, value: str, who: str, setting: str, allowed: Sequence[str]) -> JobRejected:
    listed = ", ".join(allowed) if allowed else "none"
    return JobRejected(f'"{value}" is not allowed{who}', field=field, hint=f"{setting}: {listed}")


@dataclass(frozen=True, slots=True)
class Policy:
    """The daemon's policy, built once from the settings; ``check`` judges one job for one producer."""

    allowed_deployments: tuple[str, ...] = ("*",)
    allowed_job_variables: tuple[str, ...] = ()
    producers: tuple[ProducerRule, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The policy the settings describe."""
        return cls(
            tuple(settings.allowed_deployments),
            tuple(settings.allowed_job_variables),
            tuple(settings.producers),
        )

    @property
    def launches_anything(self) -> bool:
        """True when the global patterns let a producer no rule matches launch any deployment."""
        return any(pattern in ("*", "*/*") for pattern in self.allowed_deployments)

    def check(self, job: Job, producer: Producer) -> None:
        """Accept ``job`` from ``producer``, or raise naming the first field and the rule it breaks.

        Raises:
            JobRejected: a reserved tag, a deployment or a job variable outside policy.
        """
        problems = self.problems(job, producer)
        if problems:
            raise problems[0]

    def problems(self, job: Job, producer: Producer) -> list[JobRejected]:
        """Every way ``job`` breaks the policy for ``producer`` (reserved tags, then deployments,
        then job variables; the global settings before the rules); empty when it is accepted.

        Every stage is checked as it will run: its own deployment or the job's, and
        the job's ``job_variables`` merged with the stage's.
        """
        limits = [self._global(), *(self._rule(r) for r in self.producers if r.matches(producer))]
        deployments = list(_deployments(job))
        variables = list(_job_variables(job))
        found: list[JobRejected | None] = [*reserved_tag_problems(job)]
        for rule in limits:
            found += [rule.deployment_problem(field, name) for field, name in deployments]
        for rule in limits:
            found += [rule.job_variable_problem(field, key) for field, key in variables]
        return [problem for problem in found if problem is not None]

    def _global(self) -> _Limits:
        return _Limits("", self.allowed_deployments, self.allowed_job_variables)

    @staticmethod
    def _rule(rule: ProducerRule) -> _Limits:
        return _Limits(
            f" for {rule.label}",
            None if rule.allowed_deployments is None else tuple(rule.allowed_deployments),
            None if rule.allowed_job_variables is None else tuple(rule.allowed_job_variables),
        )


def reserved_tag_problems(job: Job) -> list[JobRejected]:
    """One refusal per ``flowsubmit-*`` tag the job sets anywhere (job, stage or run), whatever the settings."""
    return [
        JobRejected(
            f'"{tag}" is a reserved tag',
            field=field,
            hint=f"tags starting with {RESERVED_TAG_PREFIX!r} are set by flowsubmit itself",
        )
        for field, tag in _tags(job)
        if tag.startswith(RESERVED_TAG_PREFIX)
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


def _tags(job: Job) -> Iterator[tuple[str, str]]:
    """(field, tag) of every tag a job sets: its own, its runs', its stages' and their runs'."""
    stages = [("", job), *((f"stages.{i}.", stage) for i, stage in enumerate(job.stages or ()))]
    for prefix, stage in stages:
        for i, tag in enumerate(stage.tags):
            yield f"{prefix}tags.{i}", tag
        for r, run in enumerate(stage.runs):
            for i, tag in enumerate(run.tags):
                yield f"{prefix}runs.{r}.tags.{i}", tag
