"""The subcommands, each declared beside its handler as a ``Command`` (``cli.command``).

- ``run``: ``run`` (the daemon in the foreground) and ``demo`` (around a local Prefect server).
- ``enqueue``: ``enqueue``, and with ``--wait`` how the job ended.
- ``validate``: ``validate`` and ``schema``, what a job file may say.
- ``status``, ``cancel``, ``health``, ``prune``: one each.

``cli.parser`` puts them in the order docs/cli.md lists them.
"""
