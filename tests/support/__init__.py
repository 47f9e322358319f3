"""What the tests share; no tests live here. ``ROOT`` (below) is the repository. One line per module, saying what it gives a test:

- ``clirunner``: many ``flowsubmit`` command lines run fast, each in a fork of one warmed-up process (``python -m tests.support.clirunner``).
- ``crashkit``: a background driver of a tag's runs, the runs a server holds for a tag, Prefect clients pointed at another server.
- ``daemons``: ``flowsubmit run`` as a subprocess with its parsed log, settings spelled as ``FLOWSUBMIT_*`` variables, enqueue and result look-ups.
- ``driver``: runs of a never-served deployment moved through their states with the real API, and a wait for a tag's runs.
- ``flows``: the test flows and their deployment names, served by the session fixture (``python -m tests.support.flows``).
- ``jobs``: ``make_job(...)``, the one builder of job documents (as a dict, the bytes of a file, or a ``Job``), defaults filled in.
- ``logscan``: every event name and key the package logs, read from its source.
- ``prefect_events``: Prefect's event feed, artifacts and deployments through the real API, and a client pointed at another server.
- ``prometheus``: a real Prometheus server on loopback scraping a daemon, and its API.
- ``proxy``: a loopback HTTP proxy before a Prefect server that cuts websockets, rate-limits and hides routes.
- ``users``: real system users, created and removed, and commands run as them.
- ``waiting``: ``until(...)``, the wait for a condition the code under test reaches by itself.
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root: where the docs are, and the working directory of the processes tests start.
ROOT = Path(__file__).resolve().parents[2]
