"""The queue directory: folders, scanning, claim by rename, per-job locks, and the final moves.

Every move is one ``rename`` inside the queue; every file that must survive a crash
is written with ``fsutil.atomic_write``. A job in ``processing/`` is owned by the
process holding ``processing/JOB.lock`` (``flock``), so several daemons can share
one queue and recovery only adopts jobs whose owner is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowsubmit.errors import ClaimLost, JobRejected
from flowsubmit.queue.crashpoints import CrashPoints
from flowsubmit.queue.fsutil import (
    UnsafeFile,
    atomic_write,
    fsync_dir,
    grant_read,
    read_regular,
    unique_name,
)
from flowsubmit.queue.journal import Journal, JournalState, replay
from flowsubmit.queue.json_stream import json_chunks
from flowsubmit.queue.locking import JobLock, check_mount

__all__ = [
    "FOLDERS",
    "Candidate",
    "Claim",
    "JobProgress",
    "Judged",
    "Queue",
    "is_job_name",
    "job_files",
    "new_job_id",
    "printable_name",
    "safe_name",
]

FOLDERS = ("tmp", "incoming", "processing", "done", "failed", "rejected")
_IGNORED = re.compile(r"^\.|\.tmp$|\.part$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Names tried for one drop when other producers' entries take them first.
_DROP_TRIES = 5
#: The default of ``max_job_bytes``: the most of a job file any reader takes in.
DEFAULT_MAX_JOB_BYTES = 1024 * 1024
#: ``processing/JOB.cancel`` asks the daemon owning JOB to cancel it; removed once the job ended.
_CANCEL_SUFFIX = ".cancel"


def is_job_name(name: str) -> bool:
    """True for names the daemon considers: ``*.json``, not dotfiles, ``*.tmp`` or ``*.part``."""
    return name.endswith(".json") and not _IGNORED.search(name)


def new_job_id() -> str:
    """A fresh, sortable, unique job id for a job file without ``id``."""
    return f"job-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def safe_name(name: str) -> str:
    """``name`` reduced to ``[A-Za-z0-9._-]``, never starting with a dot or a dash."""
    cleaned = _UNSAFE.sub("_", name).lstrip(".-") or "unnamed"
    return cleaned[:200]


def printable_name(name: str) -> str:
    """``name`` as text that can be written to a log line or a JSON file.

    A file name that is not valid UTF-8 reaches Python with its bad bytes as lone
    surrogates, which cannot be encoded; they are shown as ``\\xNN`` instead.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file seen in ``incoming/``: its name and what ``stat`` said of it."""

    name: str
    size: int
    mtime_ns: int
    ino: int = 0
    #: The owner's uid, from ``lstat``: judging is shared fairly between producers.
    uid: int = 0
    #: False for a FIFO, a socket, a device, a folder or a symbolic link: never opened, never moved.
    regular: bool = True


@dataclass(frozen=True, slots=True)
class JobProgress:
    """How far a job in ``processing/`` has come, as its journal says."""

    job_id: str
    finished: int
    created: int
    #: Runs the job's plan holds (the ``claimed`` record); None before the job is claimed.
    total: int | None
    #: Runs by their latest attempt (``JournalState.run_counts``).
    runs: dict[str, int] = field(default_factory=dict)
    #: When the job was claimed (ISO 8601), None when the journal does not say.
    claimed_at: str | None = None
    #: A live daemon holds the job's lock; False: it waits for a daemon to adopt it; None: unknown
    #: (this user may not open the lock).
    owned: bool | None = False


@dataclass
class Claim:
    """A job this process owns: its id, its file in ``processing/``, lock and journal."""

    job_id: str
    path: Path
    source: str
    lock: JobLock
    journal: Journal
    state: JournalState
    #: The producer's uid, once judged: it may read the job's copy, journal and result.
    producer_uid: int | None = None

    def release(self) -> None:
        """Close the journal and drop the lock (the job stays where it is)."""
        self.journal.close()
        self.lock.release()


class Queue:
    """Owns the queue directory layout and every move between its folders."""

    def __init__(self, root: Path, *, crash: CrashPoints | None = None) -> None:
        self.root = root
        self._crash = crash or CrashPoints()  # test-only fault injection (settings.crash_point)
        for name in FOLDERS:
            setattr(self, name, root / name)
        self.tmp: Path
        self.incoming: Path
        self.processing: Path
        self.done: Path
        self.failed: Path
        self.rejected: Path

    def ensure(self) -> None:
        """Create the folders that are missing."""
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True, mode=0o750)

    def check_locks(self) -> None:
        """Take and drop one lock in ``processing/``, and check the mount's lock options.

        Raises:
            LocksUnavailable: claims on this filesystem would not be exclusive.
        """
        check_mount(self.processing)
        probe = self.processing / f".probe-{os.getpid()}-{secrets.token_hex(4)}.lock"
        try:
            JobLock.acquire(probe).release()
        finally:
            probe.unlink(missing_ok=True)

    @property
    def owner_uid(self) -> int:
        """The queue's owner: the user of the daemon, who creates (or was given) ``processing/``."""
        try:
            return os.stat(self.processing).st_uid
        except FileNotFoundError:
            return os.stat(self.root).st_uid

    def scoped_id(self, job_id: str, uid: int, user: str | None) -> str:
        """A job's name in this queue: ``job_id`` for the queue owner's jobs, ``ID@USER`` for any other producer's.

        Ids are a namespace per producer: two producers may use the same id, and one
        producer's job never finds, blocks or attaches to another's (``@`` never appears
        in an id, so no id can pass for another producer's).
        """
        return job_id if uid == self.owner_uid else f"{job_id}@{_scope(uid, user)}"

    def others_can_write(self) -> bool:
        """True when someone but the daemon may replace or remove what it relies on: the queue
        root writable by group or others, or ``incoming/`` writable by others, or by its group
        without the sticky bit (which keeps producers from removing each other's files)."""
        root, incoming = os.stat(self.root).st_mode, os.stat(self.incoming).st_mode
        return bool(
            root & (stat.S_IWGRP | stat.S_IWOTH)
            or incoming & stat.S_IWOTH
            or (incoming & stat.S_IWGRP and not incoming & stat.S_ISVTX)
        )

    # -- producers -------------------------------------------------------------------

    def enqueue(self, data: bytes, job_id: str) -> Path:
        """Write a job into ``tmp/``, fsync it, and rename it into ``incoming/``."""
        name = f"{job_id}.json"
        staged = self.tmp / f"{name}.{secrets.token_hex(4)}.part"
        atomic_write(staged, data)
        for attempt in range(_DROP_TRIES):
            target = self.incoming / unique_name(self.incoming, name)
            try:
                os.rename(staged, target)
                break
            except PermissionError:
                # Another producer's entry took the name meanwhile (the sticky bit keeps it).
                if attempt == _DROP_TRIES - 1:
                    staged.unlink(missing_ok=True)
                    raise
        fsync_dir(self.incoming)
        return target

    # -- scanning --------------------------------------------------------------------

    def scan(self) -> list[Candidate]:
        """Entries of ``incoming/`` worth judging, oldest first (``lstat`` only, nothing opened)."""
        found: list[Candidate] = []
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                if not is_job_name(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                regular = stat.S_ISREG(st.st_mode)
                found.append(
                    Candidate(entry.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_uid, regular)
                )
        found.sort(key=lambda c: (c.mtime_ns, c.name))
        return found

    def read(self, name: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
        """Read ``incoming/name`` without following links, refusing what is not a plain, small file.

        ``O_NONBLOCK`` keeps a FIFO with no writer from blocking the open; ``fstat``
        on the open descriptor then refuses it, so nothing is judged by a name that
        could be swapped between the check and the read. That ``fstat`` is returned
        with the bytes: its owner is the producer of exactly these bytes.

        Raises:
            ClaimLost: the file vanished (another daemon took it).
            JobRejected: a symlink, a FIFO, a socket, a directory, a hard link, a file
                the daemon may not read, or too large.
        """
        try:
            return read_regular(self.incoming / name, max_bytes)
        except FileNotFoundError as exc:
            raise ClaimLost(name) from exc
        except PermissionError as exc:
            raise JobRejected(
                "the daemon may not read this file (permission denied)",
                file=name,
                hint="let the daemon's user or group read it",
            ) from exc
        except UnsafeFile as exc:
            hint = "copy it instead of linking it" if "hard links" in exc.reason else None
            raise JobRejected(exc.reason, file=name, hint=hint) from exc

    # -- claiming --------------------------------------------------------------------

    def claim(self, name: str, job_id: str, judged: Judged | None = None) -> Claim:
        """Move ``incoming/name`` to ``processing/JOB_ID.json`` under the job's lock.

        With ``judged`` (what the daemon read and judged), the move must have taken the
        very file that was read (same device and inode): a file renamed over the name
        meanwhile is put back into ``incoming/`` under a free name and the claim is lost.
        Then ``seal`` replaces the moved file by the daemon's own copy of the judged bytes,
        so what runs, now and after any restart, is what was judged.

        Raises:
            ClaimLost: the file vanished or was swapped, or another process owns this job id right now.
            JobRejected: the job id already ran (a duplicate drop of an exactly-once job).
        """
        lock = JobLock.acquire(self.processing / f"{job_id}.lock")
        try:
            self.refuse_duplicate(job_id)
            target = self.processing / f"{job_id}.json"
            try:
                os.rename(self.incoming / name, target)
            except FileNotFoundError as exc:
                raise ClaimLost(name) from exc
            fsync_dir(self.processing)
            if judged is not None:
                self._same_file(target, name, judged)
            self._crash.passed("claim.renamed")
            journal, state = Journal.open(self.processing / f"{job_id}.journal", crash=self._crash)
            claim = Claim(job_id, target, name, lock, journal, state)
            if judged is None:
                journal.append("claimed", job_id=job_id, source=name, at=_now())
                state.job_id = job_id
            else:
                self.seal(claim, judged)
        except BaseException:
            lock.release()
            raise
        return claim

    def share(self, claim: Claim) -> None:
        """Let the job's producer read its copy, journal and lock (status shows it its own job).

        Holding a shared lock on its own job's lock file is all a producer can do with it,
        and that only delays the adoption of its own job.
        """
        if claim.producer_uid is None:
            return
        for path in (claim.path, claim.journal.path, claim.lock.path):
            grant_read(path, claim.producer_uid)

    def _same_file(self, target: Path, name: str, judged: Judged) -> None:
        """Raise ``ClaimLost`` after putting back a file that is not the one judged."""
        st = os.stat(target, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (judged.st.st_dev, judged.st.st_ino):
            return
        back = self.incoming / unique_name(self.incoming, name)
        os.rename(target, back)
        fsync_dir(self.incoming)
        raise ClaimLost(f"{name} was replaced between its judging and its claim")

    def seal(self, claim: Claim, judged: Judged) -> None:
        """Make the judged bytes the job: the daemon's own copy, readable by its producer, and a
        ``claimed`` record holding their SHA-256 and the producer (the commit point of a claim)."""
        if os.stat(claim.path, follow_symlinks=False).st_uid != os.geteuid():
            atomic_write(
                claim.path, judged.data
            )  # the producer's inode is gone: open fds hold nothing
        claim.producer_uid = judged.producer_uid
        self.share(claim)
        claim.journal.append(
            "claimed",
            job_id=claim.job_id,
            source=claim.source,
            at=_now(),
            sha256=judged.sha256,
            producer=judged.producer,
            runs=judged.runs,
        )
        claim.state.job_id, claim.state.sha256 = claim.job_id, judged.sha256
        claim.state.producer, claim.state.total_runs = judged.producer, judged.runs

    def refuse_duplicate(self, job_id: str) -> None:
        """Raise ``JobRejected`` naming where ``job_id`` already is, if it is in processing/, done/ or failed/."""
        for folder in (self.processing, self.done, self.failed):
            earlier = folder / f"{job_id}.json"
            if earlier.exists():
                how = "is already running" if folder is self.processing else "already ran"
                raise JobRejected(
                    f"duplicate job id: {job_id!r} {how} as {folder.name}/{earlier.name}",
                    field="id",
                    hint="an id makes a job exactly-once; drop it without `id`, or with a new one, to run it again",
                )

    # -- cancel requests and progress ---------------------------------------------------

    def request_cancel(self, job_id: str) -> bool:
        """Ask the daemon owning ``job_id`` to cancel it; False when no such job is in ``processing/``."""
        if not (self.processing / f"{job_id}.json").exists():
            return False
        atomic_write(self.processing / f"{job_id}{_CANCEL_SUFFIX}", b"cancel requested\n")
        return True

    def waiting(
        self, job_id: str, *, by_content: bool = True, max_bytes: int = DEFAULT_MAX_JOB_BYTES
    ) -> str | None:
        """The name of the file of ``incoming/`` that holds job ``job_id``, if one does.

        ``job_id`` is the job's name in the queue (``ID@USER`` for a producer other than
        the queue's owner): only that producer's files can hold it. ``enqueue`` names a
        drop after its id; with ``by_content``, a file dropped under another name is
        found by the ``id`` inside it (read as JSON only, not judged: every waiting file
        is read, so producers dropping many jobs skip it).
        """
        bare = job_id.partition("@")[0]
        try:
            st = os.stat(self.incoming / f"{bare}.json", follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and self._names(bare, st.st_uid, job_id):
                return f"{bare}.json"
        except FileNotFoundError:
            pass
        if not by_content:
            return None
        for candidate in self.scan():
            if not candidate.regular or not self._names(bare, candidate.uid, job_id):
                continue
            try:
                data, _ = read_regular(self.incoming / candidate.name, max_bytes)
                document = json.loads(data)
            except (OSError, ValueError):
                continue  # unreadable or not JSON: the daemon will reject it, not run it
            if isinstance(document, dict) and document.get("id") == bare:
                return candidate.name
        return None

    def _names(self, bare: str, uid: int, job_id: str) -> bool:
        """True when id ``bare`` of the producer ``uid`` is the job named ``job_id`` here."""
        return self.scoped_id(bare, uid, _user_name(uid)) == job_id

    def outcome(self, job_id: str, file: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """How job ``job_id`` ended: ``("done" | "failed", result)`` or ``("rejected", error)``.

        None while it waits or runs. A job counts as ended once its file has moved:
        the result (or error) file is always written before that rename. ``file`` is the
        name the job was dropped under in ``incoming/``, when it is not ``ID.json``: a
        rejected file keeps that name (with the job's ``@USER``).
        """
        for folder in (self.done, self.failed):
            if (folder / f"{job_id}.json").exists():
                return folder.name, _load(folder / f"{job_id}.result.json")
        _, at, scope = job_id.partition("@")
        names = [job_id, *([f"{file.removesuffix('.json')}{at}{scope}"] if file else [])]
        for name in names:
            if (self.rejected / f"{name}.json").exists():
                return "rejected", _load(self.rejected / f"{name}.json.error.json")
        return None

    def cancel_requested(self, job_id: str) -> bool:
        """True while a cancel request for ``job_id`` waits in ``processing/``."""
        return (self.processing / f"{job_id}{_CANCEL_SUFFIX}").exists()

    def running(self) -> list[Path]:
        """The job files of ``processing/``, sorted by name."""
        return sorted(p for p in self.processing.glob("*.json") if not p.name.startswith("."))

    def progress(self, job_id: str) -> JobProgress:
        """What ``processing/JOB.journal`` says of the job: runs created and finished, of how many."""
        path = self.processing / f"{job_id}.json"
        state = replay(path.with_suffix(".journal"))
        total = state.total_runs
        return JobProgress(
            job_id,
            len(state.finals),
            len(state.created),
            total,
            runs=state.run_counts(),
            claimed_at=state.claimed_at,
            owned=JobLock.held(self.processing / f"{job_id}.lock"),
        )

    def orphans(self) -> list[str]:
        """Job ids in ``processing/`` (candidates for recovery; the lock decides who adopts them)."""
        return [p.stem for p in self.running()]

    def adopt(self, job_id: str) -> Claim:
        """Take over ``processing/JOB_ID.json`` whose owner is gone.

        Raises:
            ClaimLost: a live process owns it, or it was finished meanwhile.
        """
        lock = JobLock.acquire(self.processing / f"{job_id}.lock")
        path = self.processing / f"{job_id}.json"
        if not path.exists():
            lock.release()
            raise ClaimLost(job_id)
        journal, state = Journal.open(self.processing / f"{job_id}.journal", crash=self._crash)
        producer_uid = (state.producer or {}).get("uid")
        return Claim(
            job_id,
            path,
            path.name,
            lock,
            journal,
            state,
            producer_uid if isinstance(producer_uid, int) else None,
        )

    # -- ending ----------------------------------------------------------------------

    def reject(
        self, name: str, error: JobRejected, uid: int | None = None, ino: int | None = None
    ) -> Path:
        """Move ``incoming/name`` into ``rejected/`` under a safe name, with ``NAME.error.json`` beside it.

        ``uid`` is the file's owner: another producer's file is named ``STEM@USER.json``
        (as its job would be), and the error file is readable by that producer. With
        ``ino``, only that very file is moved: a file that took the name since it was
        judged is not the one refused.

        Raises:
            FileNotFoundError: the file is gone (or is another file now).
        """
        if ino is not None and os.stat(self.incoming / name, follow_symlinks=False).st_ino != ino:
            raise FileNotFoundError(name)
        return self._reject(self.incoming / name, self._rejected_stem(name, uid), error, uid)

    def reject_claimed(self, claim: Claim, error: JobRejected) -> Path:
        """Reject a job already claimed (pre-submit checks failed; no run exists), under its original name.

        An adopted job's original name is its name in ``processing/``: its job name.
        """
        adopted = claim.source == claim.path.name
        stem = claim.job_id if adopted else self._rejected_stem(claim.source, claim.producer_uid)
        target = self._reject(claim.path, stem, error, claim.producer_uid)
        self._retire_journal(claim, self.rejected, target.name.removesuffix(".json"))
        return target

    def _rejected_stem(self, name: str, uid: int | None) -> str:
        """``name`` made safe, without ``.json``, and with ``@USER`` when ``uid`` is another producer than the owner."""
        stem = safe_name(name).removesuffix(".json")
        if uid is None or uid == self.owner_uid:
            return stem
        return f"{stem}@{_scope(uid, _user_name(uid))}"

    def _reject(self, source: Path, stem: str, error: JobRejected, reader: int | None) -> Path:
        """Write ``STEM.json.error.json`` (readable by ``reader``), then move ``source`` to ``STEM.json``."""
        target_name = unique_name(self.rejected, f"{stem}.json")
        error_file = self.rejected / f"{target_name}.error.json"
        # The error first: a file in rejected/ always has its NAME.error.json.
        atomic_write(error_file, _json(error.as_dict()))
        if reader is not None:
            grant_read(error_file, reader)
        try:
            os.rename(source, self.rejected / target_name)
        except FileNotFoundError:
            error_file.unlink(missing_ok=True)  # another daemon took the file meanwhile
            raise
        fsync_dir(self.rejected)
        return self.rejected / target_name

    def finish(self, claim: Claim, succeeded: bool, result: dict[str, Any]) -> Path:
        """Write the result, then move the job to ``done/`` or ``failed/`` (the commit point).

        An iterator in ``result`` (the runs of a big job) is written as a JSON array
        item by item, never whole in memory (``json_chunks``).
        """
        folder = self.done if succeeded else self.failed
        atomic_write(folder / f"{claim.job_id}.result.json", json_chunks(result))
        if claim.producer_uid is not None:
            grant_read(folder / f"{claim.job_id}.result.json", claim.producer_uid)
        self._crash.passed("finish.result")
        target = folder / f"{claim.job_id}.json"
        os.rename(claim.path, target)
        fsync_dir(folder)
        self._crash.passed("finish.moved")
        self._retire_journal(claim, folder, claim.job_id)
        return target

    def retire_stranded(self) -> list[str]:
        """Move the journals a crash left in ``processing/`` after their job reached ``done/`` or ``failed/``.

        A crash after ``finish``'s commit rename leaves ``JOB.journal`` (and ``JOB.lock``)
        behind; the job itself is finished. Each is handled under the job's lock, so a
        live daemon finishing that job right now is never disturbed. Returns the job ids
        whose journal was moved.
        """
        retired: list[str] = []
        for journal in sorted(self.processing.glob("*.journal")):
            job_id = journal.stem
            if (self.processing / f"{job_id}.json").exists():
                continue  # a job in processing/: running, or an orphan for adopt()
            try:
                lock = JobLock.acquire(self.processing / f"{job_id}.lock")
            except ClaimLost:
                continue
            try:
                folder = self._finished_folder(job_id)
                if folder is not None and journal.exists():
                    self._move_leftovers(job_id, folder, job_id)
                    retired.append(job_id)
            finally:
                lock.release()
        return retired

    def _finished_folder(self, job_id: str) -> Path | None:
        if (self.processing / f"{job_id}.json").exists():
            return None
        for folder in (self.done, self.failed):
            if (folder / f"{job_id}.json").exists():
                return folder
        return None

    def _retire_journal(self, claim: Claim, folder: Path, stem: str) -> None:
        claim.journal.close()
        self._move_leftovers(claim.job_id, folder, stem)
        claim.lock.release()

    def _move_leftovers(self, job_id: str, folder: Path, stem: str) -> None:
        journal = self.processing / f"{job_id}.journal"
        if journal.exists():
            os.rename(journal, folder / f"{stem}.journal")
        # A cancel request is handled once its job has ended: the result says so.
        (self.processing / f"{job_id}{_CANCEL_SUFFIX}").unlink(missing_ok=True)
        fsync_dir(folder)


@dataclass(frozen=True, slots=True)
class Judged:
    """The bytes of a job file as the daemon read and judged them, and whose they are."""

    data: bytes
    #: ``fstat`` of the descriptor the bytes were read from.
    st: os.stat_result
    #: ``{"uid": 1001, "user": "etl"}``: recorded in the journal, the result and the run tag.
    producer: dict[str, Any]
    #: Runs the job's plan holds: recorded in the journal, so that ``status`` never parses the job.
    runs: int

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the bytes, recorded at the claim and checked at every adoption."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def producer_uid(self) -> int:
        """The producer's uid."""
        return int(self.producer["uid"])


#: A user name that can stand in a job name: no dot (so none ends like ``.result``) and no
#: leading digit (so none reads as another user's uid).
_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,31}$")


def _scope(uid: int, user: str | None) -> str:
    """A producer as it reads in a job name: the user name when it is a plain one, else the uid."""
    return user if user is not None and _USER_NAME.match(user) else str(uid)


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


#: A result or error file is read whole, up to this: a FIFO or a link under its name is never opened.
_RESULT_MAX_BYTES = 1 << 30


def _load(path: Path) -> dict[str, Any]:
    data, _ = read_regular(path, _RESULT_MAX_BYTES, single_link=False)
    document: dict[str, Any] = json.loads(data)
    return document


def _json(value: Any) -> bytes:
    return b"".join(json_chunks(value))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def job_files(folder: Path) -> list[Path]:
    """Job files of a folder: ``*.json`` but not results, error reports or hidden files."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.glob("*.json")
        if not p.name.startswith(".") and not p.name.endswith((".result.json", ".error.json"))
    )
