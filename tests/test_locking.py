"""The queue's filesystem must lock for every host: the rules of ``queue.locking`` (pure logic:
mount tables and errors as the kernel gives them), and the probe on a real filesystem."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from flowsubmit.errors import LocksUnavailable
from flowsubmit.queue.folders import Queue
from flowsubmit.queue.locking import check_mount, lock_failure, mount_of

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /srv/queue rw,relatime shared:20 - nfs4 fs1:/export/queue rw,vers=4.2,hard,proto=tcp
41 22 0:41 / /srv/old rw,relatime shared:21 - nfs fs1:/export/old rw,vers=3,nolock,proto=tcp
42 22 0:42 / /srv/local\\040lock rw,relatime shared:22 - nfs4 fs1:/export/x rw,vers=4.1,local_lock=flock
"""


def test_the_mount_of_a_path_is_the_longest_mount_point_above_it() -> None:
    assert str(mount_of(Path("/srv/queue/processing"), MOUNTINFO)) == "nfs4 at /srv/queue"
    assert str(mount_of(Path("/srv/queued"), MOUNTINFO)) == "ext4 at /"
    assert str(mount_of(Path("/srv/local lock/q"), MOUNTINFO)) == "nfs4 at /srv/local lock"


def test_nfs_with_working_locks_is_accepted() -> None:
    check_mount(Path("/srv/queue/processing"), MOUNTINFO)
    check_mount(Path("/var/spool/flowsubmit"), MOUNTINFO)


@pytest.mark.parametrize(
    ("path", "option"), [("/srv/old/q", "nolock"), ("/srv/local lock/q", "local_lock=flock")]
)
def test_nfs_whose_locks_stay_on_the_client_is_refused(path: str, option: str) -> None:
    with pytest.raises(LocksUnavailable, match=f"mounted {option}: its locks stay on this host"):
        check_mount(Path(path), MOUNTINFO)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EIO])
def test_a_lock_call_that_fails_for_the_filesystem_is_not_read_as_held(
    code: int, tmp_path: Path
) -> None:
    error = lock_failure(tmp_path / "job.lock", OSError(code, "refused"))
    assert error is not None
    assert str(error).startswith(f"{tmp_path}: cannot lock files on ")
    assert errno.errorcode[code] in str(error) and "not mounted nolock" in str(error)


def test_other_errors_are_left_as_they_are(tmp_path: Path) -> None:
    assert lock_failure(tmp_path / "job.lock", OSError(errno.EACCES, "denied")) is None


def test_the_probe_passes_on_a_local_filesystem_and_leaves_nothing(tmp_path: Path) -> None:
    queue = Queue(tmp_path / "queue")
    queue.ensure()
    queue.check_locks()
    assert list(queue.processing.iterdir()) == []
