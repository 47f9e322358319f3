"""The ``flowsubmit`` command: each subcommand's arguments, handler, output and exit code.

- ``commands``: the parser and the handlers of ``run``, ``validate``, ``enqueue``, ...
- ``actions``: the commands that act on the queue (``enqueue --wait``, ``cancel``).
- ``files``: reading and validating job files named on the command line.
- ``errors``: exit codes and how an error is told to a person.
- ``demo``: ``flowsubmit demo``.

The top room: it may import any other. Contract: docs/cli.md.
"""

from flowsubmit.cli.commands import main

__all__ = ["main"]
