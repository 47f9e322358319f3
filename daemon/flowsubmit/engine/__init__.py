"""One set of runs, followed to its end: the engine the daemon and the library share.

- ``runset``: a ``RunSet`` submits its runs with idempotency keys and retries the failed ones.
- ``tracker``: ONE event subscription for every run, with the batched polling fallback.
- ``results``: each run's one record (every attempt's final), the result document and summary as its views.

Imports the foundation and ``gateway``.
"""
