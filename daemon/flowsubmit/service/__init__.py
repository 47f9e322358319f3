"""The daemon: a composition of the rooms below that turns job files into finished jobs.

- ``daemon``: ``Service``, the composition root and its loop.
- ``intake``: judges files in ``incoming/`` and claims the admitted ones.
- ``jobs``: the running jobs: each claimed job's start, end, result file and move.
- ``executor``: one job's runs: pre-submit checks, stages, retries, timeout and cancel.
- ``announcer``: the jobs' ``flowsubmit.job.*`` events on Prefect's feed.
- ``prefect_health``: waits for Prefect before the daemon is ready, and while it is away.

Imports every room but ``cli`` and ``local``.
"""
