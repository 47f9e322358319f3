"""The job file: its model, its strict parser, and its expansion into runs (matrix and stages)."""

from __future__ import annotations

import difflib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowsubmit.errors import JobRejected

__all__ = [
    "MAX_NESTING",
    "Job",
    "RunSpec",
    "Stage",
    "job_schema",
    "parse_job",
]

#: JSON nesting deeper than this is refused before parsing (a parser bomb costs nothing).
MAX_NESTING = 32

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
DEPLOYMENT_PATTERN = r"^[^/\s][^/]*/[^/\s][^/]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class RunEntry(_Strict):
    """One explicit entry of ``runs``."""

    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Merged over the stage's `parameters`."
    )
    tags: list[str] = Field(
        default_factory=list, description="Added to the stage's tags for this run."
    )
    name: str | None = Field(
        default=None, max_length=200, description="Flow run name; Prefect picks one when absent."
    )


class Stage(_Strict):
    """A batch of runs of one deployment; a job is one stage or a list of them."""

    deployment: str = Field(
        pattern=DEPLOYMENT_PATTERN, max_length=400, description="`flow-name/deployment-name`."
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Defaults merged under every run."
    )
    runs: list[RunEntry] = Field(default_factory=list, description="Explicit runs.")
    matrix: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Adds one run per element of the cartesian product of its lists.",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Runs of this stage in flight at once (unbounded when absent).",
    )
    retries: int = Field(
        default=0, ge=0, le=10, description="Times a run that did not complete is submitted again."
    )
    tags: list[str] = Field(default_factory=list, description="Tags put on every run.")
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="Passed to the work pool for every run."
    )
    work_queue_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Work queue of the deployment's pool; must exist.",
    )
    create_work_queue: bool = Field(
        default=False,
        description="Allow `work_queue_name` to name a queue that does not exist yet.",
    )

    @field_validator("matrix")
    @classmethod
    def _matrix_lists_not_empty(cls, matrix: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in matrix.items():
            if not values:
                raise ValueError(f"matrix list {key!r} is empty, so the product would have no runs")
        return matrix

    @property
    def run_count(self) -> int:
        """How many runs this stage expands to, computed without expanding it."""
        product = math.prod(len(v) for v in self.matrix.values()) if self.matrix else 0
        return len(self.runs) + product

    def expand(self, stage_index: int) -> list[RunSpec]:
        """The runs of this stage, in a stable order: ``runs`` first, then the matrix."""
        specs = [
            RunSpec(
                stage=stage_index,
                index=i,
                parameters={**self.parameters, **entry.parameters},
                tags=tuple(dict.fromkeys([*self.tags, *entry.tags])),
                name=entry.name,
            )
            for i, entry in enumerate(self.runs)
        ]
        keys = list(self.matrix)
        combos = itertools.product(*(self.matrix[k] for k in keys)) if keys else ()
        for combo in combos:
            specs.append(
                RunSpec(
                    stage=stage_index,
                    index=len(specs),
                    parameters={**self.parameters, **dict(zip(keys, combo, strict=True))},
                    tags=tuple(self.tags),
                )
            )
        return specs


class StageEntry(Stage):
    """One element of ``stages``: a stage whose deployment may come from the job."""

    deployment: str = Field(
        default="",
        pattern=r"^$|" + DEPLOYMENT_PATTERN,
        max_length=400,
        description="`flow-name/deployment-name`; defaults to the job's.",
    )


class Job(Stage):
    """A job file. Top-level fields are the single stage, or the defaults of ``stages``."""

    id: str | None = Field(
        default=None,
        pattern=JOB_ID_PATTERN,
        description="Makes the job exactly-once: the same id never creates new runs. Letters, digits, `._-`, at most 128.",
    )
    deployment: str = Field(
        default="",
        pattern=r"^$|" + DEPLOYMENT_PATTERN,
        max_length=400,
        description="`flow-name/deployment-name`; required unless every stage names one.",
    )
    timeout: float | None = Field(
        default=None, gt=0, le=30 * 24 * 3600, description="Seconds the whole job may take."
    )
    on_timeout: Literal["cancel", "leave"] = Field(
        default="cancel",
        description="On timeout, cancel the runs still going, or leave them running.",
    )
    stages: list[StageEntry] | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="Run one after another; a stage starts only when the one before Completed in full.",
    )

    @model_validator(mode="after")
    def _has_runs(self) -> Job:
        if self.stages is None:
            if not self.deployment:
                raise ValueError("missing: give `deployment` (flow-name/deployment-name)")
            if self.run_count == 0:
                raise ValueError(
                    'the job has no runs: give `runs` or `matrix` (`"runs": [{}]` is one run with the defaults)'
                )
            return self
        if self.runs or self.matrix:
            raise ValueError("`runs` and `matrix` belong inside each stage when `stages` is given")
        for i, stage in enumerate(self.stages):
            if not (stage.deployment or self.deployment):
                raise ValueError(f"stage {i} has no `deployment` and the job has none either")
            if stage.run_count == 0:
                raise ValueError(f"stage {i} has no runs: give `runs` or `matrix`")
        return self

    def resolved_stages(self) -> list[Stage]:
        """The stages to run, with the job's defaults merged into each."""
        if self.stages is None:
            return [Stage.model_validate(self.model_dump(include=set(Stage.model_fields)))]
        return [
            Stage.model_validate(
                {
                    **stage.model_dump(),
                    "deployment": stage.deployment or self.deployment,
                    "parameters": {**self.parameters, **stage.parameters},
                    "tags": list(dict.fromkeys([*self.tags, *stage.tags])),
                    "job_variables": {**self.job_variables, **stage.job_variables},
                    "work_queue_name": stage.work_queue_name or self.work_queue_name,
                }
            )
            for stage in self.stages
        ]

    @property
    def total_runs(self) -> int:
        """Runs over all stages, counted without expanding."""
        return (
            sum(stage.run_count for stage in self.resolved_stages())
            if self.stages
            else self.run_count
        )


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run to create: where it sits in the job and what it is given."""

    stage: int
    index: int
    parameters: dict[str, Any]
    tags: tuple[str, ...] = ()
    name: str | None = None


def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job file (``config/job.schema.json`` is this, written out)."""
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "flowsubmit job"
    return schema


def parse_job(data: bytes, *, file: str = "", max_runs: int = 10_000) -> Job:
    """Parse and validate a job file's bytes.

    Accepts a UTF-8 byte order mark; refuses anything else that is not strict JSON
    (duplicate keys, NaN, trailing data, nesting deeper than ``MAX_NESTING``).

    Raises:
        JobRejected: naming ``file``, the field and the problem; the only exception.
    """
    try:
        return _parse(data, max_runs)
    except JobRejected as exc:
        raise exc.with_file(file) from None


def _parse(data: bytes, max_runs: int) -> Job:
    document = _load_json(data)
    if not isinstance(document, dict):
        raise JobRejected(f"a job must be a JSON object, not a JSON {_json_type(document)}")
    try:
        job = Job.model_validate(document)
    except ValidationError as exc:
        raise _rejection_from(exc) from None
    if job.total_runs > max_runs:
        raise JobRejected(
            f"the job expands to {job.total_runs} runs, more than the limit of {max_runs}",
            field="matrix" if job.matrix else "runs",
            hint="split it into several jobs or raise max_runs_per_job",
        )
    return job


def _load_json(data: bytes) -> Any:
    if not data.strip():
        raise JobRejected("the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobRejected(f"the file is not UTF-8 (bad byte at offset {exc.start})") from None
    depth = _max_depth(text)
    if depth > MAX_NESTING:
        raise JobRejected(
            f"JSON nesting is {depth} levels deep, more than the limit of {MAX_NESTING}"
        )
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise JobRejected(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise JobRejected("duplicate key in a JSON object", field=key)
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise JobRejected(f"{name} is not valid JSON")


def _max_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, found in one pass without parsing."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _json_type(value: Any) -> str:
    names = {
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _rejection_from(exc: ValidationError) -> JobRejected:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or None
    if error["type"] == "extra_forbidden":
        return JobRejected("unknown key", field=field, hint=_suggest(error["loc"]))
    if error["type"] == "missing":
        return JobRejected("missing required key", field=field)
    message = error["msg"].removeprefix("Value error, ")
    return JobRejected(message, field=field)


def _suggest(loc: tuple[int | str, ...]) -> str | None:
    known = _known_keys(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"


def _known_keys(parent: tuple[int | str, ...]) -> list[str]:
    names = [p for p in parent if isinstance(p, str)]
    if names and names[-1] == "runs":
        return list(RunEntry.model_fields)
    if names and names[-1] == "stages":
        return list(StageEntry.model_fields)
    return list(Job.model_fields)
