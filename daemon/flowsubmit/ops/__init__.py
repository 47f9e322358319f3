"""What the operator sees of a running daemon: heartbeats, status, retention, readiness.

- ``heartbeat``: each daemon's heartbeat file, and ``health`` from it.
- ``status``: the queue's state as ``flowsubmit status`` shows it.
- ``finished``: the jobs that ended (the last few, or one by id), from their result files.
- ``retention``: pruning of ``done/``, ``failed/`` and ``rejected/``.
- ``sdnotify``: systemd's ``Type=notify`` protocol.
- ``http``: ``/metrics`` (flowsubmit's registry and the default one) and ``/healthz``.
- ``backlog``: the age of the oldest job file waiting in ``incoming/``.

Imports the foundation, ``jobs``, ``settings``, ``queue`` and ``gateway.connection``.
"""
