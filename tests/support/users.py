"""Real users for the tests of the permission model: created with ``useradd``, removed with ``userdel``, and commands run as them."""

from __future__ import annotations

import grp
import pwd
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flowsubmit.ops.heartbeat import _alive  # the one liveness check of a pid (kill 0)

__all__ = ["User", "add_user", "remove_accounts", "remove_leftovers", "run_as", "user"]

#: A command that does not answer within this fails its test instead of hanging the suite.
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class User:
    """One account: its ids, and the environment its commands run with (its own HOME and PREFECT_HOME)."""

    name: str
    uid: int
    gid: int
    env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def argv(self, *command: str) -> list[str]:
        """``command`` run as this user with its groups (``setpriv`` keeps the environment it is given)."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *command]


def user(name: str, env: dict[str, str] | None = None) -> User:
    """The existing account ``name``, with ``env`` for its commands."""
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid, dict(env or {}))


def add_user(name: str) -> User:
    """Create ``name``: a system account with a group of its own, no home and no login shell."""
    _admin(
        "useradd",
        "--system",
        "--user-group",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        name,
    )
    return user(name)


def remove_accounts(users: list[str], groups: list[str]) -> None:
    """Delete the accounts (and their own groups) and the groups that exist; absent ones are skipped."""
    for name in users:
        if _exists(pwd.getpwnam, name):
            _admin("userdel", name)
    for name in groups:
        if _exists(grp.getgrnam, name):
            _admin("groupdel", name)


def remove_leftovers(pattern: re.Pattern[str]) -> None:
    """Delete the accounts and groups whose name starts with ``pattern``, when the pid it captures is gone.

    A test session names its accounts after its own pid, so a session killed before its
    clean-up leaves accounts no live session owns.
    """

    def dead(name: str) -> bool:
        match = pattern.match(name)
        return match is not None and not _alive(int(match.group(1)))

    remove_accounts(
        [e.pw_name for e in pwd.getpwall() if dead(e.pw_name)],
        [e.gr_name for e in grp.getgrall() if dead(e.gr_name)],
    )


def run_as(
    who: User,
    *command: str,
    cwd: Path | None = None,
    stdin: str | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as ``who`` with its environment; a hang raises ``TimeoutExpired``."""
    return subprocess.run(
        who.argv(*command),
        env=who.env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _admin(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)}: exit {done.returncode}: {done.stderr}"
