"""The job file: its model, its strict parser, and its expansion into runs (matrix and stages)."""

from __future__ import annotations

import functools
import heapq
import itertools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from flowsubmit._wording import did_you_mean, sentence, short, show
from flowsubmit.errors import JobRejected
from flowsubmit.jobs.plan import Plan
from flowsubmit.jobs.strict_json import MAX_NESTING, json_type, load_json

__all__ = [
    "DEPLOYMENT_HINT",
    "MAX_NESTING",
    "MAX_PROBLEMS",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "RESERVED_ID_SUFFIXES",
    "Job",
    "RunSpec",
    "Stage",
    "capped",
    "check_job",
    "deployment_name_problem",
    "job_schema",
    "parse_job",
]

#: The range of a job's ``priority`` (higher first; 0 by default).
PRIORITY_MIN, PRIORITY_MAX = -100, 100

#: A file's problems are reported up to this many, the first in file order; one more counts the rest.
MAX_PROBLEMS = 20

#: Most stages a job may have.
_MAX_STAGES = 100

#: Run counts are computed up to this; a job expanding to more is said to be "more than" it.
_COUNT_CEILING = 10**18

#: Endings of the queue's own files (``JOB.result.json``, ``JOB.journal``...): an id may not end
#: in one (compared case-insensitively), so that no job's files can pass for another's.
RESERVED_ID_SUFFIXES = (
    ".result",
    ".journal",
    ".lock",
    ".cancel",
    ".error",
    ".json",
    ".tmp",
    ".part",
)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# The JSON Schema's portable approximation of the name rule (JSON Schema regexes have no
# Unicode classes); the parser checks each character itself (``_deployment_problem``).
_NAME_PATTERN = r"[^/\s#?%&\\](?:[^/#?%&\\]*[^/\s#?%&\\])?"
DEPLOYMENT_PATTERN = rf"^{_NAME_PATTERN}/{_NAME_PATTERN}$"

_ID_RULE = (
    "an id is 1 to 128 characters: letters A-Z a-z, digits, '.', '_' and '-', "
    "starting with a letter or a digit"
)
DEPLOYMENT_HINT = "`prefect deployment ls` lists the deployments"
_NAME_RULE = "a flow or deployment name holds letters, digits, '_', '-', '.' and inner spaces"
# Letters (with their marks) and digits of any script, and these: a name goes into a URL
# path, where '#', '?', '%', '&' and '\\' would change which deployment is read.
_NAME_CATEGORIES = ("L", "M", "N")
_NAME_PUNCTUATION = frozenset("_-. ")


class _FieldProblem(ValueError):
    """Raised by the model's validators: a plain sentence, the field it is about, and a hint."""

    def __init__(self, reason: str, field: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.field = field
        self.hint = hint


#: A tag is a short label: its length is bounded before anything (Unicode normalisation of a
#: reserved-tag check, whose cost grows faster than the length) looks at it.
TAG_MAX_LENGTH = 200
Tag = Annotated[str, Field(max_length=TAG_MAX_LENGTH)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class RunEntry(_Strict):
    """One explicit entry of ``runs``."""

    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Merged over the stage's `parameters`."
    )
    tags: list[Tag] = Field(
        default_factory=list, description="Added to the stage's tags for this run."
    )
    name: str | None = Field(
        default=None, max_length=200, description="Flow run name; Prefect picks one when absent."
    )


class Stage(_Strict):
    """A batch of runs of one deployment; a job is one stage or a list of them."""

    deployment: str = Field(
        min_length=1,
        max_length=400,
        json_schema_extra={"pattern": DEPLOYMENT_PATTERN},
        description="`flow-name/deployment-name`.",
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
    tags: list[Tag] = Field(default_factory=list, description="Tags put on every run.")
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

    @field_validator("deployment")
    @classmethod
    def _deployment_is_two_names(cls, deployment: str) -> str:
        problem = _deployment_problem(deployment) if deployment else None
        if problem is not None:
            raise _FieldProblem(problem[0], field="deployment", hint=problem[1])
        return deployment

    @field_validator("matrix")
    @classmethod
    def _matrix_lists_not_empty(cls, matrix: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in matrix.items():
            if not values:
                raise _FieldProblem(
                    "is an empty list, so the matrix would have no runs", field=f"matrix.{key}"
                )
        return matrix

    def runs_up_to(self, ceiling: int) -> int:
        """How many runs this stage lists, counted without listing them; or a number above ``ceiling`` as
        soon as the matrix is known to pass it.

        The product of a matrix with thousands of keys is a number with thousands of
        digits: stopping at the ceiling keeps counting linear.
        """
        product = 1 if self.matrix else 0
        for values in self.matrix.values():
            product *= len(values)
            if product > ceiling:
                break
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
        max_length=400,
        json_schema_extra={"pattern": r"^$|" + DEPLOYMENT_PATTERN},
        description="`flow-name/deployment-name`; defaults to the job's.",
    )


class Job(Stage):
    """A job file. Top-level fields are the single stage, or the defaults of ``stages``."""

    id: str | None = Field(
        default=None,
        pattern=JOB_ID_PATTERN,
        description=(
            "Makes the job exactly-once: the same id never creates new runs. Letters, digits, "
            "`._-`, at most 128; not ending in one of the queue's own suffixes (`.json`, `.result`, ...)."
        ),
    )
    deployment: str = Field(
        default="",
        max_length=400,
        json_schema_extra={"pattern": r"^$|" + DEPLOYMENT_PATTERN},
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
        max_length=_MAX_STAGES,
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

    @field_validator("id")
    @classmethod
    def _id_not_a_queue_suffix(cls, job_id: str | None) -> str | None:
        suffix = _reserved_suffix(job_id or "")
        if suffix is not None:
            raise _FieldProblem(
                f"the job id ends in {show(suffix)}, a suffix the queue gives its own files",
                field="id",
                hint=f"an id may not end in {', '.join(RESERVED_ID_SUFFIXES)} (in any case)",
            )
        return job_id

    @model_validator(mode="after")
    def _has_runs(self) -> Job:
        if self.stages is None:
            if not self.deployment:
                raise _FieldProblem(
                    "is missing: a job names the deployment to run",
                    field="deployment",
                    hint=f"`flow-name/deployment-name`; {DEPLOYMENT_HINT}",
                )
            if not (self.runs or self.matrix):
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
            if not (stage.runs or stage.matrix):
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

    @functools.cached_property
    def plan(self) -> Plan:
        """The stages to run and every run of each, built once for this job."""
        return Plan.of(self.resolved_stages(), staged=self.stages is not None)

    @property
    def total_runs(self) -> int:
        """Runs over all stages."""
        return self.plan.total_runs

    def total_runs_up_to(self, ceiling: int) -> int:
        """``total_runs``, or a number above ``ceiling`` as soon as the count is known to pass it."""
        total = 0
        stages: Sequence[Stage] = self.stages or [self]
        for stage in stages:
            total += stage.runs_up_to(ceiling)
            if total > ceiling:
                break
        return total


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
    """Judge a job file as ``parse_job`` does, but report its problems instead of the first.

    The cost is linear in the file's size, whatever it holds: each object's key order
    is indexed once, and only the problems reported are put into words.

    Returns:
        ``(job, [])`` for a good file, else ``(None, problems)``: each problem names
        ``file``, the first ``MAX_PROBLEMS`` in the order of the fields in the file, then
        one that counts the rest. A file that is not JSON has one.
    """
    try:
        document = load_json(data)
        if not isinstance(document, dict):
            raise JobRejected(f"a job must be a JSON object, not a JSON {json_type(document)}")
    except JobRejected as exc:
        return None, [exc.with_file(file)]
    known, unknown, count = _split_unknown(document, Job, (), ())
    if count:
        # One unknown key for pydantic, so that it fails the job as the keys taken out
        # would have: the job's model validator (which would add "no runs") does not run.
        # Its error is dropped with the other unknown-key errors.
        known[_UNKNOWN] = None
    try:
        job = Job.model_validate(known, strict=True)
    except ValidationError as exc:
        positions = _Positions(document)
        errors = [
            (positions.of(e["loc"]), e)
            for e in exc.errors(include_url=False)
            if e["type"] != "extra_forbidden"
        ]
        return None, _reported([*unknown, *errors], count + len(errors), file)
    if count:
        return None, _reported(unknown, count, file)
    total = job.total_runs_up_to(max(max_runs, _COUNT_CEILING))
    if total > max_runs:
        runs = f"more than {_COUNT_CEILING}" if total > _COUNT_CEILING else str(total)
        return None, [
            JobRejected(
                f"the job expands to {runs} runs, more than the limit of {max_runs}",
                file=file,
                field="matrix" if job.matrix else "runs",
                hint="split it into several jobs or raise max_runs_per_job",
            )
        ]
    return job, []


#: A problem before it is put into words: where it is in the file, and pydantic's error.
_Located = tuple[tuple[int, ...], ErrorDetails]


def _reported(errors: list[_Located], total: int, file: str) -> list[JobRejected]:
    """The first ``MAX_PROBLEMS`` errors in file order as rejections, and one that counts the rest of ``total``."""
    first = heapq.nsmallest(MAX_PROBLEMS, errors, key=lambda located: located[0])
    problems = [_rejection_from(error).with_file(file) for _, error in first]
    return _with_count(problems, total - len(first), file)


def capped(problems: list[JobRejected], file: str = "") -> list[JobRejected]:
    """The first ``MAX_PROBLEMS`` of ``problems``, and one that counts the rest, as ``check_job`` reports them."""
    return _with_count(problems[:MAX_PROBLEMS], len(problems) - MAX_PROBLEMS, file)


def _with_count(problems: list[JobRejected], rest: int, file: str) -> list[JobRejected]:
    if rest <= 0:
        return problems
    more = JobRejected(
        f"and {rest} more problem{'s' if rest != 1 else ''}, not listed",
        file=file,
        hint=f"only the first {MAX_PROBLEMS} are; fix them and check the file again",
    )
    return [*problems, more]


# The keys each model knows, and the model of each list of objects it holds, by key.
_KNOWN: dict[type[BaseModel], frozenset[str]] = {
    model: frozenset(model.model_fields) for model in (Job, StageEntry, RunEntry)
}
_NESTED: dict[type[BaseModel], tuple[tuple[str, type[BaseModel]], ...]] = {
    Job: (("runs", RunEntry), ("stages", StageEntry)),
    StageEntry: (("runs", RunEntry),),
    RunEntry: (),
}


def _split_unknown(
    value: Any, model: type[BaseModel], loc: tuple[int | str, ...], position: tuple[int, ...]
) -> tuple[Any, list[_Located], int]:
    """``value`` without the keys ``model`` (and the models inside it) does not know, and those keys.

    pydantic would report them too, but a file of a hundred thousand unknown keys
    costs it a dictionary per key and then a search of its object per key. Here the
    keys' positions come from one pass, an object's first ``MAX_PROBLEMS`` unknown keys
    become errors and the rest only a count, and objects without unknown keys are kept.

    Returns:
        The value to validate, the errors (in file order within each object), and
        how many unknown keys there are in all.
    """
    if not isinstance(value, dict):
        return value, [], 0
    known, nested = _KNOWN[model], _NESTED[model]
    if not nested and value.keys() <= known:
        return value, [], 0
    indexes = [] if value.keys() <= known else [i for i, k in enumerate(value) if k not in known]
    keys = list(value) if indexes or nested else []
    located: list[_Located] = [
        ((*position, i), _unknown_key((*loc, keys[i]), value[keys[i]]))
        for i in indexes[:MAX_PROBLEMS]
    ]
    count = len(indexes)
    kept = {key: item for key, item in value.items() if key in known}
    for key, inner in nested:
        items = kept.get(key)
        if not isinstance(items, list) or (key == "stages" and len(items) > _MAX_STAGES):
            continue  # pydantic says what is wrong with the list before looking into it
        at, inner_known, deep = (*position, keys.index(key)), _KNOWN[inner], bool(_NESTED[inner])
        kept[key] = items = list(items)
        for i, entry in enumerate(items):
            if isinstance(entry, dict) and (deep or not entry.keys() <= inner_known):
                items[i], errors, n = _split_unknown(entry, inner, (*loc, key, i), (*at, i))
                located += errors
                count += n
    return kept, located, count


def _unknown_key(loc: tuple[int | str, ...], value: Any) -> ErrorDetails:
    """The error pydantic gives a key its model does not know."""
    return {"type": "extra_forbidden", "loc": loc, "msg": "", "input": value}


#: A key no model knows (a file holding it has it among its unknown keys anyway).
_UNKNOWN = "\x00unknown"

#: Objects of at most this many keys are searched, not indexed: a search costs at most this.
_SMALL = 16


class _Positions:
    """Where a ``loc`` sits in the file: the index of each key or item on the way down.

    JSON objects keep the file's key order, so sorting by this puts the problems in
    file order; a missing key sorts after the keys that are present. Each object's
    keys are indexed once, so finding many positions costs one pass over the document.
    """

    def __init__(self, document: Any) -> None:
        self._document = document
        self._indexes: dict[int, dict[str, int]] = {}

    def of(self, loc: tuple[int | str, ...]) -> tuple[int, ...]:
        """The position of ``loc``."""
        position: list[int] = []
        value = self._document
        for part in loc:
            if isinstance(value, dict) and isinstance(part, str):
                position.append(self._index(value, part))
                value = value.get(part)
            elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
                position.append(part)
                value = value[part]
            else:
                break
        return tuple(position)

    def _index(self, mapping: dict[str, Any], key: str) -> int:
        if len(mapping) <= _SMALL:
            return list(mapping).index(key) if key in mapping else len(mapping)
        # Keyed by id(): every object indexed lives in the document, which outlives this.
        index = self._indexes.get(id(mapping))
        if index is None:
            index = self._indexes[id(mapping)] = {key: i for i, key in enumerate(mapping)}
        return index.get(key, len(index))


def _rejection_from(error: Any) -> JobRejected:
    """One pydantic error as a rejection naming the field by its full path."""
    loc = tuple(str(part) for part in error["loc"])
    field = short(".".join(loc)) or None
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, _FieldProblem):
        # A field validator's problem names its field from the model it validates
        # (`matrix.x`); a model validator's is at the model itself. Either way the
        # path down to that model (`stages.1.`) goes in front.
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
    problem = _deployment_problem(name)
    if problem is None:
        return None
    return JobRejected(problem[0], field="deployment", hint=problem[1])


def _deployment_problem(value: str) -> tuple[str, str] | None:
    """What is wrong with ``flow-name/deployment-name`` and a hint, in words; None when nothing is."""
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        return (
            f"must be a flow name and a deployment name joined by one '/', not {show(value)}",
            f"`flow-name/deployment-name`; {DEPLOYMENT_HINT}",
        )
    for which, name in zip(("flow", "deployment"), parts, strict=True):
        if name[0] == " " or name[-1] == " ":
            where = "starts" if name[0] == " " else "ends"
            return f"the {which} name {where} with a space", _NAME_RULE
        bad = next((char for char in name if not _name_character(char)), None)
        if bad is not None:
            return f"the {which} name contains {show(bad)}, which a name may not hold", _NAME_RULE
    return None


def _name_character(char: str) -> bool:
    return char in _NAME_PUNCTUATION or unicodedata.category(char)[0] in _NAME_CATEGORIES


def _reserved_suffix(job_id: str) -> str | None:
    """The queue's own suffix ``job_id`` ends in, as written in the id; None when it ends in none."""
    folded = job_id.lower()
    suffix = next((s for s in RESERVED_ID_SUFFIXES if folded.endswith(s)), None)
    return None if suffix is None else job_id[-len(suffix) :]


def _pattern_rejection(name: str, value: str, field: str | None) -> JobRejected:
    """A value refused by its field's ``pattern``: only ``id`` has one."""
    return JobRejected(f"the job id {_id_problem(value)}", field=field, hint=_ID_RULE)


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
