"""Everything that talks to Prefect: the only room that imports ``prefect`` or ``httpx``.

- ``client``: ``Gateway``, the calls flowsubmit makes (create, read, cancel, stream).
- ``translate``: Prefect's errors as ``errors``' (transient, permanent, credentials), and
  the retry policy that bounds an operation by the outage tolerance.
- ``convert``: what is sent and read back (bulk items, snapshots of runs and events,
  the parameter check), as pure functions.
- ``scheduler`` and ``pacer``: how many create calls are in flight and how large.
- ``connection``: which server the process talks to, and its versions.
- ``job_events``: the ``flowsubmit.job.*`` events' shape and their delivery.
- ``server``: what the server is (``/admin/version``): refused, or which routes to use.
- ``older_clients``: what an older Prefect client needs before it can be used.
- ``diagnosis``: what a failed call says about the URL (unreachable, not a Prefect API, credentials).
- ``run_logger``: the logger of the Prefect run the library is called from, if any.

Imports the foundation only; the rooms above see Prefect through ``Gateway``.
"""
