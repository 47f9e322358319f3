"""Prefect servers and flows on this machine, for the demo, the tests and the benchmarks.

- ``localserver``: an embedded (SQLite) Prefect server and served flows.
- ``topology``: Prefect's production topology (PostgreSQL, Redis, N API replicas).
- ``examples``: the demo's flow.

Imports nothing of the engine; only ``cli`` imports it.
"""
