"""The intake: judges the files of ``incoming/``, claims the good ones, rejects the bad ones once settled, adopts orphans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import structlog

from flowsubmit.errors import ClaimLost, JobRejected
from flowsubmit.jobs import Job, parse_job
from flowsubmit.policy import Policy, Producer, producer_of
from flowsubmit.queue import Candidate, Claim, Queue, new_job_id, printable_name
from flowsubmit.settings import Settings

__all__ = ["Intake"]

log = structlog.get_logger("flowsubmit.intake")

#: The scan hands the event loop back after this many files, so running jobs go on during a flood.
_YIELD_EVERY = 50
#: Time one scan may spend rejecting (three fsyncs each); the rest waits for the next scan, so a
#: slot freed meanwhile goes to a good job first (the moves wake the watcher at once).
_REJECT_BUDGET_S = 0.5


@dataclass(slots=True)
class _Verdict:
    """What judging a file of ``incoming/`` found; valid while the file is unchanged."""

    candidate: Candidate
    #: Why the file is refused, or None for a good job waiting for a free slot.
    error: JobRejected | None
    #: When this exact file (name, size, mtime, inode) was first seen, on the monotonic clock.
    since: float = field(default_factory=time.monotonic)
    #: A good job's ``priority``: claims go highest first, then oldest (#13).
    priority: int = 0


class Intake:
    """Owns the verdicts on the files of ``incoming/`` (pruned on every scan) and the broken-file memory.

    ``scan()`` claims good jobs, highest priority first, while ``has_capacity()`` says so, and hands each to
    ``start(claim, job, producer, recovered=False)``; bad files are moved to
    ``rejected/`` once settled and reported to ``rejected``. ``adopt_orphans()`` hands
    the jobs of ``processing/`` whose owner is gone to ``start(claim, job, producer,
    recovered=True)``. ``admit`` is the one place a new job is accepted or refused,
    by its content and by the ``policy`` for its producer (#14).
    """

    def __init__(
        self,
        queue: Queue,
        settings: Settings,
        *,
        has_capacity: Callable[[], bool],
        start: Callable[[Claim, Job, Producer, bool], None],
        rejected: Callable[[JobRejected, Path], None],
    ) -> None:
        self.queue = queue
        self.settings = settings
        self._has_capacity = has_capacity
        self._start = start
        self._rejected = rejected
        #: What jobs may ask for (#14), as the settings held now say.
        self.policy = Policy.from_settings(settings)
        self._verdicts: dict[str, _Verdict] = {}
        #: Files whose judging raised (logged once per version of the file).
        self._broken: dict[str, Candidate] = {}

    def admit(self, candidate: Candidate, data: bytes, producer: Producer) -> Job:
        """Parse a job file's bytes and accept the job from ``producer``, or raise ``JobRejected`` saying why not."""
        job = parse_job(data, file=candidate.name, max_runs=self.settings.max_runs_per_job)
        self.policy.check(job, producer)
        return job

    def adopt_orphans(self, owned: Callable[[str], bool]) -> None:
        """Resume ``processing/`` jobs whose owner is gone (this daemon before a crash, or a dead peer)."""
        for job_id in self.queue.retire_stranded():
            log.info("job.journal_retired", job_id=job_id)
        for job_id in self.queue.orphans():
            if owned(job_id) or not self._has_capacity():
                continue
            try:
                claim = self.queue.adopt(job_id)
            except ClaimLost:
                continue
            try:
                job, producer = self._recovered(claim)
            except JobRejected as exc:
                error = exc.with_file(claim.path.name)
                self._rejected(error, self.queue.reject_claimed(claim, error))
                continue
            self._start(claim, job, producer, True)

    def _recovered(self, claim: Claim) -> tuple[Job, Producer]:
        """Parse an adopted job; one that has not created a run yet is judged by the policy held now.

        A job that created runs keeps running to its end under the policy it was
        claimed with (#14): its runs exist in Prefect; ``flowsubmit cancel`` stops it.
        """
        job = parse_job(
            claim.path.read_bytes(), file=claim.path.name, max_runs=self.settings.max_runs_per_job
        )
        producer = producer_of(claim.path.stat())  # a rename keeps the owner: the creator
        if not claim.state.created:
            self.policy.check(job, producer)
        return job, producer

    async def scan(self, stopping: Callable[[], bool]) -> None:
        """Judge every file of ``incoming/``, claim the good ones in priority order, then reject the bad ones that have settled.

        A verdict is remembered while its file is unchanged, so a rescan of thousands
        of waiting files reads only the new or changed ones. Good jobs are claimed
        while slots are free, highest ``priority`` first, then oldest (#13), so a
        high-priority job dropped while every slot is busy takes the next free one.
        Bad files are rejected (three fsyncs each) only after the pass that claims,
        and for at most ``_REJECT_BUDGET_S`` per scan, so good jobs never wait behind
        bad ones (#6). The loop yields every ``_YIELD_EVERY`` files so that running
        jobs go on during a flood.
        """
        candidates = self.queue.scan()
        to_reject: list[str] = []
        for i, candidate in enumerate(candidates):
            if stopping():
                return
            if self._guarded(candidate, partial(self._judge, candidate)):
                to_reject.append(candidate.name)
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
        present = {c.name for c in candidates}
        for cache in (self._verdicts, self._broken):
            for name in [n for n in cache if n not in present]:
                del cache[name]
        self._claim_waiting()
        deadline = time.monotonic() + _REJECT_BUDGET_S
        for i, name in enumerate(to_reject):
            if time.monotonic() > deadline:
                return
            verdict = self._verdicts.get(name)
            if verdict is not None:
                self._guarded(verdict.candidate, partial(self._reject, verdict))
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)

    def _guarded(self, candidate: Candidate, judge: Callable[[], bool | None]) -> bool:
        """Run one file's judging; a bug or an I/O error is logged (once per version) and skipped."""
        try:
            return bool(judge())
        except Exception as exc:  # one file must never stop the daemon or the other files
            if self._broken.get(candidate.name) != candidate:
                self._broken[candidate.name] = candidate
                log.error(
                    "job.judge_failed",
                    file=printable_name(candidate.name),
                    error=str(exc),
                    exc_info=exc,
                )
            return False

    def _judge(self, candidate: Candidate) -> bool:
        """Read a new or changed file and remember the verdict; True when the file is bad and has settled."""
        known = self._verdicts.get(candidate.name)
        if known is None or known.candidate != candidate:
            try:
                job, _ = self._read(candidate)
            except ClaimLost:
                self._verdicts.pop(candidate.name, None)  # gone: another daemon took it
                return False
            except JobRejected as exc:
                known = _Verdict(candidate, exc.with_file(printable_name(candidate.name)))
            else:
                known = _Verdict(candidate, None, priority=job.priority)
            self._verdicts[candidate.name] = known
        return known.error is not None and self._settled(known)

    def _read(self, candidate: Candidate) -> tuple[Job, Producer]:
        """Read and admit ``incoming/NAME``; raises ``JobRejected``, or ``ClaimLost`` when it is gone."""
        data, st = self.queue.read(candidate.name, self.settings.max_job_bytes)
        producer = producer_of(st)  # from the descriptor read: the owner of these bytes
        return self.admit(candidate, data, producer), producer

    def _claim_waiting(self) -> None:
        """Claim good jobs while slots are free: highest ``priority`` first, then oldest."""
        waiting = sorted(
            (v for v in self._verdicts.values() if v.error is None),
            key=lambda v: (-v.priority, v.candidate.mtime_ns, v.candidate.name),
        )
        for verdict in waiting:
            if not self._has_capacity():
                return
            self._guarded(verdict.candidate, partial(self._try_claim, verdict))

    def _try_claim(self, verdict: _Verdict) -> None:
        """Read the file again (it may have been replaced since it was judged) and claim it."""
        name = verdict.candidate.name
        try:
            job, producer = self._read(verdict.candidate)
            claim = self.queue.claim(name, job.id or new_job_id())
        except ClaimLost:
            self._verdicts.pop(name, None)  # gone, or its id is running right now: look again later
            return
        except JobRejected as exc:
            verdict.error = exc.with_file(printable_name(name))  # rejected once it has settled
            return
        self._verdicts.pop(name, None)
        self._start(claim, job, producer, False)

    def _settled(self, verdict: _Verdict) -> bool:
        """True once the file has stayed unchanged for ``settle_s``: a bad file still being written is never rejected.

        Unchanged means this daemon saw the same size, mtime and inode for ``settle_s``,
        or the mtime is at least twice ``settle_s`` old (a file that sat there before the
        daemon started is judged on the first scan).
        """
        settle_s = self.settings.settle_s
        seen_s = time.monotonic() - verdict.since
        age_s = time.time() - verdict.candidate.mtime_ns / 1e9
        return seen_s >= settle_s or age_s >= 2 * settle_s

    def _reject(self, verdict: _Verdict) -> None:
        name, error = verdict.candidate.name, verdict.error
        assert error is not None
        self._verdicts.pop(name, None)
        try:
            target = self.queue.reject(name, error)
        except FileNotFoundError:
            return  # another daemon moved it first
        self._rejected(error, target)
