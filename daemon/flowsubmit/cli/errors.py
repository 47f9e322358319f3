"""The command line's one error path: every expected failure is one line, ``flowsubmit: <what>: <why>``, and an exit code.

Commands raise ``CliError`` (or any of flowsubmit's own errors, or an ``OSError``);
``guarded`` turns it into the line on stderr and the documented exit code, so a
new subcommand gets the same treatment without writing any of it. A traceback is
printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from flowsubmit.errors import (
    FlowsubmitError,
    GatewayError,
    JobRejected,
    PermanentGatewayError,
    SettingsError,
    TransientGatewayError,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "Parser",
    "describe",
    "guarded",
]

#: The documented exit codes (docs/cli.md): success, runtime failure, bad usage or input.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
#: Stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An expected failure of a command: ``what`` failed because of ``why``; never a traceback."""

    def __init__(
        self, what: str, why: str, *, code: int = EXIT_USAGE, hint: str | None = None
    ) -> None:
        self.what = what
        self.why = why
        self.code = code
        self.hint = hint
        super().__init__(f"{what}: {why}")

    def lines(self) -> list[str]:
        """What stderr shows: the error line, then the hint on a line of its own."""
        hint = [f"  hint: {self.hint}"] if self.hint else []
        return [f"flowsubmit: {self.what}: {self.why}", *hint]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors go through the same path as every other error."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage block and exiting (argparse's default)."""
        command = self.prog.removeprefix("flowsubmit").strip() or "usage"
        raise CliError(command, message, hint=f"`{self.prog} --help` shows the options")


def guarded(command: Callable[[], int], *, debug: bool = False) -> int:
    """Run ``command`` and return its exit code; an expected failure prints its line(s) instead.

    Standard output is flushed inside, so a reader that went away (``| head``) is
    reported here rather than by the interpreter at exit.
    """
    try:
        code = command()
        sys.stdout.flush()
        return code
    except BrokenPipeError as exc:
        _discard_stdout()
        return _fail(exc, debug)
    except KeyboardInterrupt as exc:
        return _fail(exc, debug)
    except Exception as exc:  # the one boundary: anything else is described, not dumped
        return _fail(exc, debug)


def describe(exc: BaseException) -> CliError:
    """The ``CliError`` an exception stands for (flowsubmit's errors, OS errors, a bug)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]  # a TaskGroup wraps what the daemon raised
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, BrokenPipeError):
        return CliError(
            "standard output", "closed by the reader before everything was written", code=EXIT_ERROR
        )
    if isinstance(exc, KeyboardInterrupt):
        return CliError("interrupted", "stopped by Ctrl-C", code=EXIT_INTERRUPTED)
    if isinstance(exc, SettingsError):
        return CliError(exc.source, exc.reason, hint=exc.hint)
    if isinstance(exc, JobRejected):
        field = f"field {exc.field!r}: " if exc.field else ""
        return CliError(exc.file or "job", f"{field}{exc.reason}", hint=exc.hint)
    if isinstance(exc, GatewayError):
        return _gateway_error(exc)
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, FlowsubmitError):  # its message already reads "<what>: <why>"
        what, _, why = str(exc).partition(": ")
        return CliError(what, why, code=EXIT_ERROR) if why else CliError("error", what, code=1)
    return CliError(
        "internal error",
        f"{type(exc).__name__}: {exc}",
        code=EXIT_ERROR,
        hint="run it again with --debug for the traceback, and please report it",
    )


def _gateway_error(exc: GatewayError) -> CliError:
    if isinstance(exc, TransientGatewayError):
        return CliError(
            "Prefect",
            f"unreachable or busy: {exc}",
            code=EXIT_ERROR,
            hint="is PREFECT_API_URL right, and the server up?",
        )
    code = EXIT_USAGE if isinstance(exc, PermanentGatewayError) else EXIT_ERROR
    return CliError("Prefect", f"refused: {exc}", code=code)


def _os_error(exc: OSError) -> CliError:
    if exc.errno is None:  # raised with a message, not by the system: TimeoutError("...")
        what = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        return CliError(what, str(exc), code=EXIT_ERROR)
    what = os.fsdecode(exc.filename) if exc.filename is not None else "system"
    why = exc.strerror or str(exc) or type(exc).__name__
    return CliError(what, why[:1].lower() + why[1:], code=EXIT_ERROR)


def _fail(exc: BaseException, debug: bool) -> int:
    error = describe(exc)
    try:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        for line in error.lines():
            print(line, file=sys.stderr)
        sys.stderr.flush()
    except OSError:
        pass  # stderr is gone too: the exit code is all that is left to say it
    return error.code


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # not a real file (a test's capture): nothing will be flushed to a pipe
