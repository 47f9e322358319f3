"""The job file: its model, its strict parser, and its expansion into runs (matrix and stages)."""

from __future__ import annotations

import codecs
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowsubmit._wording import did_you_mean, sentence, short, show
from flowsubmit.errors import JobRejected

__all__ = [
    "DEPLOYMENT_HINT",
    "MAX_NESTING",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "Job",
    "RunSpec",
    "Stage",
    "check_job",
    "deployment_name_problem",
    "job_schema",
    "parse_job",
]

#: JSON nesting deeper than this is refused before parsing (a parser bomb costs nothing).
MAX_NESTING = 32

#: The range of a job's ``priority`` (higher first; 0 by default).
PRIORITY_MIN, PRIORITY_MAX = -100, 100

#: Integers longer than this are refused (Python's own int-from-text limit is 4300 digits).
MAX_DIGITS = 4300

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
DEPLOYMENT_PATTERN = r"^[^/\s][^/]*/[^/\s][^/]*$"

_ID_RULE = (
    "an id is 1 to 128 characters: letters A-Z a-z, digits, '.', '_' and '-', "
    "starting with a letter or a digit"
)
DEPLOYMENT_HINT = "`prefect deployment ls` lists the deployments"
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)
_NOT_A_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^\[\]{}"]+|"')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")


class _FieldProblem(ValueError):
    """Raised by the model's validators: a plain sentence, the field it is about, and a hint."""

    def __init__(self, reason: str, field: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.field = field
        self.hint = hint


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
                raise _FieldProblem(
                    "is an empty list, so the matrix would have no runs", field=f"matrix.{key}"
                )
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
    priority: int = Field(
        default=0,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description=(
            "Higher first: orders claims from `incoming/` and the turns jobs get at submission "
            f"({PRIORITY_MIN} to {PRIORITY_MAX}; 0 by default)."
        ),
    )

    @model_validator(mode="after")
    def _has_runs(self) -> Job:
        if self.stages is None:
            if not self.deployment:
                raise _FieldProblem(
                    "is missing: a job names the deployment to run",
                    field="deployment",
                    hint=f"`flow-name/deployment-name`; {DEPLOYMENT_HINT}",
                )
            if self.run_count == 0:
                raise _FieldProblem(
                    "the job has no runs: give `runs` or `matrix`",
                    field="runs",
                    hint='`"runs": [{}]` is one run with the default parameters',
                )
            return self
        if self.runs or self.matrix:
            raise _FieldProblem(
                "is not allowed at the top level when `stages` is given: put it inside each stage",
                field="runs" if self.runs else "matrix",
            )
        for i, stage in enumerate(self.stages):
            if not (stage.deployment or self.deployment):
                raise _FieldProblem(
                    "is missing, and the job has no `deployment` either",
                    field=f"stages.{i}.deployment",
                    hint=DEPLOYMENT_HINT,
                )
            if stage.run_count == 0:
                raise _FieldProblem(
                    f"stage {i} has no runs: give `runs` or `matrix`", field=f"stages.{i}.runs"
                )
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

    The text must be UTF-8; a leading UTF-8 byte order mark is accepted and ignored
    (editors on Windows add one), any other byte order mark is refused. Anything that
    is not strict JSON is refused: duplicate keys, NaN and Infinity, numbers too
    large to be finite or longer than ``MAX_DIGITS``, lone ``\\uD800``-style escapes,
    trailing data, nesting deeper than ``MAX_NESTING``. Values are not coerced: the
    string ``"3"`` is not a number and ``true`` is not ``1``.

    Raises:
        JobRejected: the first problem of the file (in file order), naming ``file``,
            the field and the problem; the only exception.
    """
    job, problems = check_job(data, file=file, max_runs=max_runs)
    if problems:
        raise problems[0]
    assert job is not None
    return job


def check_job(
    data: bytes, *, file: str = "", max_runs: int = 10_000
) -> tuple[Job | None, list[JobRejected]]:
    """Judge a job file as ``parse_job`` does, but report every problem instead of the first.

    Returns:
        ``(job, [])`` for a good file, else ``(None, problems)``: each problem names
        ``file``, in the order of the fields in the file. A file that is not JSON has one.
    """
    try:
        document = _load_json(data)
        if not isinstance(document, dict):
            raise JobRejected(f"a job must be a JSON object, not a JSON {_json_type(document)}")
    except JobRejected as exc:
        return None, [exc.with_file(file)]
    try:
        job = Job.model_validate(document, strict=True)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda error: _file_position(document, error["loc"]))
        return None, [_rejection_from(error).with_file(file) for error in errors]
    if job.total_runs > max_runs:
        return None, [
            JobRejected(
                f"the job expands to {job.total_runs} runs, more than the limit of {max_runs}",
                file=file,
                field="matrix" if job.matrix else "runs",
                hint="split it into several jobs or raise max_runs_per_job",
            )
        ]
    return job, []


def _file_position(document: Any, loc: tuple[int | str, ...]) -> tuple[int, ...]:
    """Where ``loc`` sits in the file: the index of each key or item on the way down.

    JSON objects keep the file's key order, so sorting by this puts the problems in
    file order; a missing key sorts after the keys that are present.
    """
    position: list[int] = []
    value = document
    for part in loc:
        if isinstance(value, dict) and isinstance(part, str):
            keys = list(value)
            position.append(keys.index(part) if part in value else len(keys))
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            position.append(part)
            value = value[part]
        else:
            break
    return tuple(position)


def _load_json(data: bytes) -> Any:
    text = _decode(data)
    if not text.strip():
        raise JobRejected("the file is empty" if not data else "the file holds only whitespace")
    if _too_deep(text):
        raise JobRejected(f"JSON nesting is more than {MAX_NESTING} levels deep (the limit)")
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constants,
            parse_int=_integer,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        what = (
            "unexpected data after the end of the JSON value"
            if exc.msg == "Extra data"
            else exc.msg
        )
        raise JobRejected(
            f"not valid JSON: {what} at line {exc.lineno} column {exc.colno}"
        ) from None
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(document, ())
    return document


def _decode(data: bytes) -> str:
    for bom, encoding in _OTHER_BOMS:
        if data.startswith(bom):
            raise JobRejected(
                f"the file is {encoding} (it starts with a {encoding} byte order mark)",
                hint="save it as UTF-8",
            )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JobRejected(
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint="save it as UTF-8",
        ) from None


def _too_deep(text: str) -> bool:
    """True when brackets nest deeper than ``MAX_NESTING`` outside strings; found without parsing.

    Strings and everything else are removed in C, then each pass strips the innermost
    ``[]`` pairs, so the passes count the depth of matched brackets (stopping past the
    limit); openers left unmatched add to it, as a parser would descend into them too.
    """
    brackets = _NOT_A_BRACKET.sub("", text).translate({ord("{"): "[", ord("}"): "]"})
    for passes in range(MAX_NESTING + 1):
        if "[]" not in brackets:
            return passes + brackets.count("[") > MAX_NESTING
        brackets = brackets.replace("[]", "")
    return True


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise JobRejected("appears twice in the same JSON object", field=short(key))
        seen[key] = value
    return seen


def _no_constants(name: str) -> Any:
    raise JobRejected(
        f"{name} is not valid JSON", hint="JSON has no NaN or Infinity: use null or a number"
    )


def _integer(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise JobRejected(
            f"a number with {len(text)} digits is too long (the limit is {MAX_DIGITS} digits)"
        )
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JobRejected(f"the number {short(text, 40)} is too large to be represented")
    return value


def _refuse_lone_surrogates(value: Any, path: tuple[str, ...]) -> None:
    """Refuse strings holding half of a UTF-16 pair (``"\\ud800"``): they cannot be written out as UTF-8."""
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, (*path, str(i)))
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, (*path, "<key>"))
            _refuse_lone_surrogates(item, (*path, key))


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field = short(".".join(path).encode("utf-8", "backslashreplace").decode()) or None
        raise JobRejected(
            "holds a lone UTF-16 surrogate escape (such as \\ud800), which is not text",
            field=field,
        ) from None


def _json_type(value: Any) -> str:
    names = {
        dict: "object",
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _rejection_from(error: Any) -> JobRejected:
    """One pydantic error as a rejection naming the field by its full path."""
    loc = tuple(str(part) for part in error["loc"])
    field = short(".".join(loc)) or None
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldProblem):
        # A field validator's problem names its field from the model it validates
        # (`matrix.x`); a model validator's is at the model itself. Either way the
        # path down to that model (`stages.1.`) goes in front (#11).
        at_model = loc[:-1] if loc and cause.field.split(".")[0] == loc[-1] else loc
        return JobRejected(
            str(cause), field=short(".".join((*at_model, cause.field))), hint=cause.hint
        )
    if error["type"] == "extra_forbidden":
        return JobRejected("unknown key", field=field, hint=_suggest(error["loc"]))
    if error["type"] == "string_pattern_mismatch":
        return _pattern_rejection(str(error["loc"][-1]), error["input"], field)
    return JobRejected(sentence(error), field=field)


def deployment_name_problem(name: str) -> JobRejected | None:
    """Why ``name`` is not ``flow-name/deployment-name``, as a job file's ``deployment`` is told; None when it is."""
    if re.match(DEPLOYMENT_PATTERN, name):
        return None
    return _pattern_rejection("deployment", name, "deployment")


def _pattern_rejection(name: str, value: str, field: str | None) -> JobRejected:
    if name == "id":
        return JobRejected(f"the job id {_id_problem(value)}", field=field, hint=_ID_RULE)
    return JobRejected(
        f"must be a flow name and a deployment name joined by one '/', not {show(value)}",
        field=field,
        hint=f"`flow-name/deployment-name`; {DEPLOYMENT_HINT}",
    )


def _id_problem(value: str) -> str:
    """What is wrong with an id that does not match ``JOB_ID_PATTERN``, in words."""
    if not value:
        return "is empty (leave `id` out to get a fresh one)"
    if len(value) > 128:
        return f"is {len(value)} characters long, more than the limit of 128"
    for char in value:
        if char in "/\\":
            return f"contains a path separator {show(char)}"
        if ord(char) < 32 or 127 <= ord(char) < 160:
            return f"contains a control character {show(char)}"
    if value in (".", ".."):
        return f"{show(value)} names a folder"
    if not (value[0].isascii() and value[0].isalnum()):
        return f"starts with {show(value[0])}"
    bad = next(c for c in value if not (c.isascii() and (c.isalnum() or c in "._-")))
    return f"contains {show(bad)}"


def _suggest(loc: tuple[int | str, ...]) -> str:
    return did_you_mean(str(loc[-1]), _known_keys(loc[:-1]))


def _known_keys(parent: tuple[int | str, ...]) -> list[str]:
    names = [p for p in parent if isinstance(p, str)]
    if names and names[-1] == "runs":
        return list(RunEntry.model_fields)
    if names and names[-1] == "stages":
        return list(StageEntry.model_fields)
    return list(Job.model_fields)
