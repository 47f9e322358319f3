"""The ``flowsubmit`` command: each subcommand's arguments, handler, output and exit code.

- ``parser``: ``flowsubmit`` itself, its subcommands in the documented order, and ``main``.
- ``command``: what a subcommand declares (name, help, example, arguments, handler).
- ``run`` (with ``demo``), ``enqueue``, ``validate`` (with ``schema``), ``status``, ``cancel``,
  ``health``, ``prune``: one module per subcommand, each declaring its arguments beside its
  handler.
- ``options``: the options subcommands share (``--debug``, ``--queue``, ``--config``, the
  settings flags), and the settings they make.
- ``actions``: the commands that act on the queue (``enqueue --wait``, ``cancel``).
- ``files``: reading and judging job files named on the command line.
- ``errors``: exit codes and how an error is told to a person.
- ``demo``: what ``flowsubmit demo`` starts and stops.

The top room: it may import any other. Contract: docs/cli.md.
"""

from flowsubmit.cli.parser import main

__all__ = ["main"]
