"""One set of runs, followed to its end: the engine the daemon and the library share.

- ``runset``: a ``RunSet`` submits its runs with idempotency keys and retries the failed ones.
- ``tracker``: ONE event subscription for every run, with the batched polling fallback.
- ``results``: a run's record, a job's result, and the summary line.

Imports the foundation and ``gateway``.
"""
