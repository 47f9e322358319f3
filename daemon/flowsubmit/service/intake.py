"""The intake: judges the files of ``incoming/`` off the event loop, claims the good ones, rejects the bad ones once settled, adopts orphans."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from flowsubmit.errors import ClaimLost, JobRejected, LocksUnavailable
from flowsubmit.jobs.model import Job, parse_job
from flowsubmit.jobs.policy import Policy, Producer, producer_by_uid, producer_of
from flowsubmit.logs import get_logger
from flowsubmit.queue.folders import Candidate, Claim, Judged, Queue, new_job_id, printable_name
from flowsubmit.queue.fsutil import UnsafeFile, read_regular
from flowsubmit.settings import Settings

__all__ = ["SWITCH_INTERVAL_S", "CallbackHost", "Intake", "JobHost"]

log = get_logger("flowsubmit.intake")

#: Files judged at once, each in a worker thread, so a slow file never holds the event loop;
#: one at a time per producer, so a producer's flood of costly files never delays another's.
_JUDGES = 4
_JUDGES_PER_PRODUCER = 1
#: The interpreter's thread switch interval while judging threads run (``sys.setswitchinterval``;
#: Python's default is 5 ms). The loop thread gives up the lock at every system call and waits up
#: to an interval to get it back from a judging thread: with ten 1 MiB files being judged, a
#: 10 ms timer on the loop lagged 74 ms at 5 ms and 23 ms at 1 ms (bench/key_bombs.py).
SWITCH_INTERVAL_S = 0.001
#: A file whose judging takes longer is refused (parsing is linear in the file's size, so
#: only a pathological file comes near it); its thread finishes on its own.
_JUDGE_BUDGET_S = 10.0
#: Parsed jobs kept for their claims, at most: those judged last while a slot was free, which are
#: claimed at once. A file claimed after it fell out of this is parsed again at its claim.
_KEPT_JOBS = 8
#: Time one scan may spend rejecting (three fsyncs each); the rest waits for the next scan, so a
#: slot freed meanwhile goes to a good job first (the moves wake the watcher at once).
_REJECT_BUDGET_S = 0.5


class JobHost(Protocol):
    """Who runs the jobs the intake claims (``service.jobs.RunningJobs``)."""

    def __contains__(self, job_id: object) -> bool:
        """``job_id`` runs here now."""

    def has_capacity(self, producer: Producer | None) -> bool:
        """A slot is free for one more job (of ``producer``)."""

    def start(self, claim: Claim, job: Job, producer: Producer, recovered: bool) -> None:
        """Run a claimed job (``recovered``: adopted from ``processing/``)."""

    def rejected(self, error: JobRejected, target: Path) -> None:
        """A file was moved to ``rejected/`` as ``target``."""

    def stop_recovered(self, claim: Claim, error: JobRejected) -> None:
        """End an adopted job that may not go on; it creates no more runs."""


@dataclass(frozen=True)
class CallbackHost:
    """A ``JobHost`` made of functions: the intake without a daemon (benchmarks, tests)."""

    has_capacity: Callable[[Producer | None], bool]
    start: Callable[[Claim, Job, Producer, bool], None]
    rejected: Callable[[JobRejected, Path], None]
    stop_recovered: Callable[[Claim, JobRejected], None]
    running: Callable[[str], bool] = lambda _: False

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self.running(job_id)


@dataclass(slots=True)
class _Verdict:
    """What judging a file of ``incoming/`` found; valid while the file is unchanged."""

    candidate: Candidate
    #: Why the file is refused, or None for a good job waiting for a free slot.
    error: JobRejected | None
    #: When this exact file (name, size, mtime, inode) was first seen, on the monotonic clock.
    since: float = field(default_factory=time.monotonic)
    producer: Producer | None = None
    #: SHA-256 of the bytes judged: the claim re-reads the file and must find them.
    sha256: str = ""
    #: A good job's ``priority``: claims go highest first, then oldest.
    priority: int = 0
    #: The job parsed from these bytes, on its way from the judging thread to ``Intake._kept``.
    job: Job | None = None


class Intake:
    """Owns the verdicts on the files of ``incoming/``, the judging threads and the broken-file memory.

    ``scan()`` lists ``incoming/`` and hands new or changed files to the judging
    threads, fairest first (the producer judged least, then the smallest file); each
    verdict is kept while its file is unchanged. Good jobs are claimed as soon as they
    are judged, highest priority first, while ``jobs.has_capacity(producer)`` says so, and
    handed to ``jobs.start(claim, job, producer, recovered=False)``; bad files are moved to
    ``rejected/`` once settled and reported to ``jobs.rejected``. ``adopt_orphans()`` judges
    the jobs of ``processing/`` whose owner is gone again, by their recorded bytes and
    the policy held now, and resumes them (``recovered=True``) or stops them
    (``jobs.stop_recovered``). Claims happen the moment a judging ends, not at a scan, so
    the intake hands them over as they come rather than returning them.
    """

    def __init__(self, queue: Queue, settings: Settings, policy: Policy, jobs: JobHost) -> None:
        self.queue = queue
        self.settings = settings
        #: What jobs may ask for, as the settings held now say.
        self.policy = policy
        self._jobs = jobs
        self._verdicts: dict[str, _Verdict] = {}
        #: Files whose judging raised (logged once per version of the file).
        self._broken: dict[str, Candidate] = {}
        #: Entries that are not regular files: never opened, never moved (logged once per version).
        self._ignored: dict[str, Candidate] = {}
        #: Files waiting for a judging thread, and the ones being judged.
        self._pending: dict[str, Candidate] = {}
        self._judging: dict[str, asyncio.Task[None]] = {}
        #: The owner uid of each file in judging.
        self._owners: dict[str, int] = {}
        #: Judgings started per producer uid: the next file is the least-judged producer's.
        self._turns: Counter[int] = Counter()
        self._pool = ThreadPoolExecutor(
            _JUDGES, thread_name_prefix="flowsubmit-judge", initializer=_behind_the_loop
        )
        #: The jobs parsed from the latest good verdicts, by file name, oldest first: the claim of
        #: such a file reuses its job instead of parsing the bytes again.
        self._kept: OrderedDict[str, tuple[str, Job]] = OrderedDict()
        #: The one task claiming jobs, while there are jobs to claim and slots for them.
        self._claimer: asyncio.Task[None] | None = None

    def close(self) -> None:
        """Stop judging: cancel what waits, let the threads end on their own; idempotent."""
        for task in [*self._judging.values(), self._claimer]:
            if task is not None:
                task.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def admit(self, name: str, data: bytes, producer: Producer) -> Job:
        """Parse a job file's bytes and accept the job from ``producer``, or raise ``JobRejected`` saying why not."""
        job = parse_job(data, file=name, max_runs=self.settings.max_runs_per_job)
        self.policy.check(job, producer)
        return job

    # -- adoption ------------------------------------------------------------------------

    async def adopt_orphans(self) -> None:
        """Resume ``processing/`` jobs whose owner is gone (this daemon before a crash, or a dead peer)."""
        for job_id in self.queue.retire_stranded():
            log.info("job.journal_retired", job_id=job_id)
        for job_id in self.queue.orphans():
            if job_id in self._jobs or not self._jobs.has_capacity(None):
                continue
            try:
                claim = self.queue.adopt(job_id)
            except ClaimLost:
                continue
            try:
                job, producer = await self._recovered(claim)
            except JobRejected as exc:
                error = exc.with_file(claim.path.name)
                if claim.state.created:
                    self._jobs.stop_recovered(claim, error)  # its runs exist: no more are created
                else:
                    self._jobs.rejected(error, self.queue.reject_claimed(claim, error))
                continue
            self._jobs.start(claim, job, producer, True)

    async def _recovered(self, claim: Claim) -> tuple[Job, Producer]:
        """Judge an adopted job again: its bytes must be those judged at the claim, and the
        policy held now must accept it (a job that created runs too: it creates no more).

        A job never sealed (a crash between the claim's rename and its record, or a journal
        written before the bytes were recorded) is judged as it stands and sealed now.
        """
        state = claim.state
        try:
            data, st = read_regular(claim.path, self.settings.max_job_bytes)
        except (UnsafeFile, PermissionError) as exc:
            raise JobRejected(f"the claimed job file cannot be read: {exc}") from exc
        if state.sha256 is not None:
            if hashlib.sha256(data).hexdigest() != state.sha256:
                raise JobRejected(
                    "the job file changed after its claim: its bytes are not the ones judged",
                    hint="nothing but the daemon may write processing/; drop the job again",
                )
            producer = producer_by_uid(int((state.producer or {})["uid"]))
        else:
            producer = producer_of(st)  # a rename keeps the owner: the creator
        claim.producer_uid = producer.uid
        job = await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(self.admit, claim.path.name, data, producer)
        )
        if state.sha256 is None:
            self.queue.seal(claim, Judged(data, st, producer.as_dict(), job.total_runs))
        else:
            self.queue.share(claim)  # the lock file is new
        return job, producer

    # -- scanning ------------------------------------------------------------------------

    async def scan(self, stopping: Callable[[], bool]) -> None:
        """List ``incoming/``, start judging what is new or changed, claim what is judged good,
        then reject the bad files that have settled.

        A verdict is remembered while its file is unchanged, so a rescan of thousands of
        waiting files reads only the new or changed ones. Judging runs in threads and
        claims as soon as it ends, so no file waits for the next scan, and none holds
        the loop. Bad files are rejected (three fsyncs each) only after the pass that
        claims, and for at most ``_REJECT_BUDGET_S`` per scan, so good jobs never wait
        behind bad ones.
        """
        candidates = self.queue.scan()
        present = {c.name for c in candidates}
        for cache in (self._verdicts, self._broken, self._ignored, self._pending, self._kept):
            for name in [n for n in cache if n not in present]:
                del cache[name]
        for candidate in candidates:
            if stopping():
                return
            self._consider(candidate)
        self._fill()
        self._claim_waiting()
        await self._reject_settled()

    def _consider(self, candidate: Candidate) -> None:
        """Queue a new or changed file for judging; log a non-regular entry once."""
        if not candidate.regular:
            if self._ignored.get(candidate.name) != candidate:
                self._ignored[candidate.name] = candidate
                log.warning(
                    "job.ignored",
                    file=printable_name(candidate.name),
                    reason="not a regular file (a FIFO, socket, device, folder or symbolic link)",
                )
            return
        known = self._verdicts.get(candidate.name)
        if known is not None and known.candidate == candidate:
            return
        if candidate.name not in self._judging:
            self._pending[candidate.name] = candidate

    def _fill(self) -> None:
        """Start judging pending files while a thread is free: the least-judged producer first,
        then the smallest file; a producer with ``_JUDGES_PER_PRODUCER`` files in judging waits."""
        while len(self._judging) < _JUDGES:
            busy = Counter(self._owners.values())
            ready = [c for c in self._pending.values() if busy[c.uid] < _JUDGES_PER_PRODUCER]
            if not ready:
                return
            candidate = min(ready, key=lambda c: (self._turns[c.uid], c.size, c.mtime_ns, c.name))
            del self._pending[candidate.name]
            self._turns[candidate.uid] += 1
            self._owners[candidate.name] = candidate.uid
            task = asyncio.create_task(
                self._judge(candidate), name=f"flowsubmit-judge-{candidate.name}"
            )
            self._judging[candidate.name] = task
            task.add_done_callback(partial(self._judged, candidate.name))

    def _judged(self, name: str, task: asyncio.Task[None]) -> None:
        """A judging ended: free its thread for the next file; a bug in it is logged, never lost."""
        if self._judging.get(name) is task:
            del self._judging[name]
            self._owners.pop(name, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("job.judge_failed", file=printable_name(name), error=str(exc), exc_info=exc)
        if not task.cancelled():
            self._fill()

    async def _judge(self, candidate: Candidate) -> None:
        """Judge one file in a thread, within ``_JUDGE_BUDGET_S``; claim it at once if it is good."""
        loop = asyncio.get_running_loop()
        work: Awaitable[_Verdict | None] = loop.run_in_executor(
            self._pool, self._read_and_judge, candidate
        )
        try:
            verdict = await asyncio.wait_for(work, _JUDGE_BUDGET_S)
        except TimeoutError:
            verdict = _Verdict(
                candidate,
                JobRejected(
                    f"judging the file took more than {_JUDGE_BUDGET_S:.0f} s",
                    file=printable_name(candidate.name),
                    hint="a job file is a small JSON object; split a big job into several",
                ),
            )
        except Exception as exc:  # one file must never stop the daemon or the other files
            self._log_broken(candidate, exc)
            return
        if verdict is None:
            self._verdicts.pop(candidate.name, None)  # gone: another daemon took it
            return
        known = self._verdicts.get(candidate.name)
        if known is not None and known.candidate == candidate:
            verdict.since = known.since  # the same version of the file: its settling goes on
        self._verdicts[candidate.name] = verdict
        if verdict.job is not None:
            if self._jobs.has_capacity(verdict.producer):
                self._keep(candidate.name, verdict.sha256, verdict.job)
            else:
                log.debug(
                    "job.waiting",
                    file=printable_name(candidate.name),
                    priority=verdict.priority,
                    producer=verdict.producer.as_dict() if verdict.producer else None,
                )
            verdict.job = None  # the verdict outlives the claim; the parsed job need not
        if verdict.error is None:
            self._claim_waiting()

    def _read_and_judge(self, candidate: Candidate) -> _Verdict | None:
        """Read and admit ``incoming/NAME`` (in a judging thread); None when it is gone."""
        try:
            data, st = self.queue.read(candidate.name, self.settings.max_job_bytes)
        except ClaimLost:
            return None
        except JobRejected as exc:
            return _Verdict(candidate, exc.with_file(printable_name(candidate.name)))
        producer = producer_of(st)  # from the descriptor read: the owner of these bytes
        try:
            job = self.admit(printable_name(candidate.name), data, producer)
        except JobRejected as exc:
            return _Verdict(candidate, exc.with_file(printable_name(candidate.name)))
        digest = hashlib.sha256(data).hexdigest()
        return _Verdict(
            candidate, None, producer=producer, sha256=digest, priority=job.priority, job=job
        )

    def _keep(self, name: str, sha256: str, job: Job) -> None:
        """Keep the job parsed from ``name``'s bytes (``sha256``) for its claim, which is near: a
        job that must wait for a slot is parsed again at its claim, so waiting files cost their
        verdicts only."""
        self._kept[name] = (sha256, job)
        self._kept.move_to_end(name)
        while len(self._kept) > _KEPT_JOBS:
            self._kept.popitem(last=False)

    def _log_broken(self, candidate: Candidate, exc: BaseException) -> None:
        """A bug or an I/O error while handling one file: logged once per version, then skipped."""
        if self._broken.get(candidate.name) != candidate:
            self._broken[candidate.name] = candidate
            log.error(
                "job.judge_failed",
                file=printable_name(candidate.name),
                error=str(exc),
                exc_info=exc,
            )

    # -- claiming ------------------------------------------------------------------------

    def _claim_waiting(self) -> None:
        """Start the claimer unless it is running: it claims good jobs while slots are free."""
        if self._claimer is None or self._claimer.done():
            self._claimer = asyncio.create_task(self._claim_all(), name="flowsubmit-claimer")
            self._claimer.add_done_callback(self._claimer_done)

    def _claimer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("job.judge_failed", file=None, error=str(exc), exc_info=exc)

    def _next_to_claim(self) -> _Verdict | None:
        """The good job to claim next: highest ``priority``, then oldest, whose producer has a slot.

        One pass over the verdicts, asking once per producer (a group rule reads the group
        database): thousands of waiting files of a producer at its limit cost one question.
        """
        if not self._jobs.has_capacity(None):
            return None
        room: dict[int, bool] = {}
        best: _Verdict | None = None
        for verdict in self._verdicts.values():
            producer = verdict.producer
            if verdict.error is not None or producer is None:
                continue
            if producer.uid not in room:
                room[producer.uid] = self._jobs.has_capacity(producer)
            if room[producer.uid] and (best is None or _order(verdict) < _order(best)):
                best = verdict
        return best

    async def _claim_all(self) -> None:
        """Claim one job at a time, its moves and fsyncs in a thread so the loop never waits on a
        disk, until no slot or no good job is left; each claimed job starts at once."""
        while (verdict := self._next_to_claim()) is not None:
            name = verdict.candidate.name
            sha256, kept = self._kept.pop(name, ("", None))
            if sha256 != verdict.sha256:
                kept = None  # parsed from other bytes than the verdict's
            work = asyncio.ensure_future(asyncio.to_thread(self._claim, verdict, kept))
            try:
                claim = await asyncio.shield(work)
            except asyncio.CancelledError:
                work.add_done_callback(_release_late_claim)  # stopping: the job stays for a restart
                raise
            except ClaimLost:
                claim = None  # gone, swapped, or its id is running right now
            except JobRejected as exc:
                verdict.error = exc.with_file(printable_name(name))  # rejected once it has settled
                continue
            except LocksUnavailable:
                raise  # not the file's fault: no claim on this filesystem is exclusive
            except Exception as exc:  # one file must never stop the daemon or the other files
                self._log_broken(verdict.candidate, exc)
                claim = None
            # Claimed, or gone or changed: judged again at the next scan if still there.
            self._verdicts.pop(name, None)
            if claim is not None:
                assert verdict.producer is not None
                self._jobs.start(*claim, verdict.producer, False)

    def _claim(self, verdict: _Verdict, kept: Job | None) -> tuple[Claim, Job] | None:
        """Claim the file if it still holds the bytes judged (read again: same hash, same owner); in a thread.

        The same bytes make the same job: the one parsed when they were judged (``kept``) is
        checked against the policy again rather than parsed again; a job no longer kept is.

        Returns None when the file changed since it was judged.

        Raises:
            ClaimLost: the file is gone or was swapped, or its job id is running right now.
            JobRejected: unreadable now, or its id already ran.
        """
        name, producer = verdict.candidate.name, verdict.producer
        assert producer is not None
        data, st = self.queue.read(name, self.settings.max_job_bytes)
        if hashlib.sha256(data).hexdigest() != verdict.sha256 or st.st_uid != producer.uid:
            return None
        if kept is None:
            job = self.admit(printable_name(name), data, producer)
        else:
            job = kept
            self.policy.check(job, producer)
        job_id = self.queue.scoped_id(job.id or new_job_id(), producer.uid, producer.user)
        judged = Judged(data, st, producer.as_dict(), job.total_runs)
        return self.queue.claim(name, job_id, judged), job

    # -- rejecting -----------------------------------------------------------------------

    async def _reject_settled(self) -> None:
        """Move the bad files that have settled into ``rejected/`` (each in a thread), for at most
        ``_REJECT_BUDGET_S`` per scan so that the next scan's good files are not kept waiting."""
        deadline = time.monotonic() + _REJECT_BUDGET_S
        for verdict in [v for v in self._verdicts.values() if v.error is not None]:
            if time.monotonic() > deadline:
                return
            if (
                not self._settled(verdict)
                or self._verdicts.get(verdict.candidate.name) is not verdict
            ):
                continue
            self._verdicts.pop(verdict.candidate.name, None)
            try:
                target = await asyncio.to_thread(self._reject, verdict)
            except Exception as exc:  # one file must never stop the daemon or the other files
                self._log_broken(verdict.candidate, exc)
                continue
            if target is not None and verdict.error is not None:
                self._jobs.rejected(verdict.error, target)

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

    def _reject(self, verdict: _Verdict) -> Path | None:
        """Move one bad file into ``rejected/`` (in a thread); None when another daemon moved it first."""
        assert verdict.error is not None
        try:
            candidate = verdict.candidate
            return self.queue.reject(candidate.name, verdict.error, candidate.uid, candidate.ino)
        except FileNotFoundError:
            return None


def _behind_the_loop() -> None:
    """Lower this judging thread's CPU priority: on a busy machine the loop thread runs first.

    Linux keeps a nice value per thread; raising one's own needs no privilege.
    """
    thread = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + 10))


def _order(verdict: _Verdict) -> tuple[int, int, str]:
    """Claims go highest ``priority`` first, then oldest."""
    return (-verdict.priority, verdict.candidate.mtime_ns, verdict.candidate.name)


def _release_late_claim(work: asyncio.Future[tuple[Claim, Job] | None]) -> None:
    """Drop a claim that completed after its claimer was cancelled (the job stays in processing/)."""
    if not work.cancelled() and work.exception() is None and (claimed := work.result()) is not None:
        claimed[0].release()
