"""The queue directory's file protocol, and nothing else.

- ``folders``: ``incoming/`` → ``processing/`` → ``done/`` | ``failed/`` | ``rejected/``,
  each move one atomic rename (``Queue``, ``Claim``).
- ``journal``: a job's append-only, fsynced journal and its replay.
- ``locking``: the per-job lock that makes a claim exclusive (``JobLock``), and whether the
  filesystem's locks hold across hosts (refused: ``nolock``, ``ENOLCK``).
- ``json_stream``: a result document written as it is encoded, never whole in memory.
- ``fsutil``: safe reads of files producers own, durable writes, ACL grants.
- ``watcher``: wakeups when ``incoming/`` changes (inotify via watchfiles, or a rescan).
- ``crashpoints``: the named points where tests make the daemon die (``kill -9``).

Contracts: docs/operations.md (folders, recovery). Imports the foundation and ``jobs``;
never Prefect.
"""
