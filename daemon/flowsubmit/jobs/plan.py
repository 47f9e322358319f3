"""A job's plan: its stages with the job's defaults merged in, every run listed once, and their count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowsubmit.jobs.model import RunSpec, Stage

__all__ = ["Plan", "PlannedStage"]


@dataclass(frozen=True, slots=True)
class PlannedStage:
    """One stage as it runs: its settings (the job's defaults merged in) and its runs in order."""

    index: int
    stage: Stage
    runs: tuple[RunSpec, ...]
    #: The job listed ``stages``: its problems name ``stages.N.FIELD`` and ``stage N run M``.
    staged: bool

    def field(self, name: str) -> str:
        """Where ``name`` of this stage is in the job file: ``name`` or ``stages.N.name``."""
        return f"stages.{self.index}.{name}" if self.staged else name

    def where(self, run_index: int) -> str:
        """How a problem names one run: ``run M`` or ``stage N run M``."""
        return f"stage {self.index} run {run_index}" if self.staged else f"run {run_index}"

    def where_at(self, position: int) -> str:
        """How a problem names the run at ``position`` in ``runs`` (``where``)."""
        return self.where(self.runs[position].index)


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a job will run, built once from the job (``Job.plan``) and read by all who need it:
    the pre-submit checks, the executor, the ``claimed`` record's total and ``status``."""

    stages: tuple[PlannedStage, ...]

    @classmethod
    def of(cls, stages: Sequence[Stage], *, staged: bool) -> Plan:
        """The plan of resolved ``stages``, each expanded once."""
        return cls(
            tuple(PlannedStage(i, s, tuple(s.expand(i)), staged) for i, s in enumerate(stages))
        )

    @property
    def total_runs(self) -> int:
        """Runs over all stages."""
        return sum(len(stage.runs) for stage in self.stages)
