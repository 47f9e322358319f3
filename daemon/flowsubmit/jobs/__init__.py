"""The job file and what it may do: its model, its plan of runs, and the producers' policy.

- ``model``: the job document (``parse_job``, ``check_job``, the JSON Schema) and its limits.
- ``strict_json``: how a job file's bytes are read: strict JSON, linear in the file's size.
- ``plan``: a job's plan (``Job.plan``): its stages resolved, every run listed once, counted.
- ``policy``: who may submit what (``Policy``, ``Producer``), judged on a parsed job.

A pure room: no I/O but reading a file's bytes it is given. Imports only the
package's foundation (``errors``, ``_wording``, ``_types``).
"""
