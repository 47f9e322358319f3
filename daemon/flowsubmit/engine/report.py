"""A job's report for people: its summary and each run that did not succeed, as Markdown.

A view of a ``JobResult`` (the artifact ``flowsubmit-<job id>`` shows it in Prefect's UI);
parameters are never part of it.
"""

from __future__ import annotations

from collections.abc import Callable

from flowsubmit.engine.results import JobResult

__all__ = ["job_markdown"]

#: Failing runs listed at most; the rest are counted.
MAX_LISTED = 50


def job_markdown(result: JobResult, ui_url: Callable[[str], str | None]) -> str:
    """The report: a heading, the summary line, and a table of the runs that did not succeed."""
    summary = result.summary
    lines = [
        f"# flowsubmit job `{result.job_id}`: {result.status.value}",
        "",
        f"{summary.line} in {result.duration_s:g} s.",
    ]
    if result.error:
        lines += ["", f"Error: {_cell(result.error)}"]
    failing = [run for run in result.runs if not run.succeeded]
    if failing:
        lines += [
            "",
            "| stage | index | deployment | run | state | message |",
            "|---|---|---|---|---|---|",
        ]
        for run in failing[:MAX_LISTED]:
            link = _run_link(run.flow_run_id, run.flow_run_name, ui_url)
            message = run.state_message or run.error or ""
            lines.append(
                f"| {run.stage} | {run.index} | {run.deployment} | {link} | "
                f"{run.state_name or 'NotFinished'} | {_cell(message)} |"
            )
        if len(failing) > MAX_LISTED:
            lines += ["", f"... and {len(failing) - MAX_LISTED} more (see the result file)."]
    return "\n".join(lines) + "\n"


def _run_link(run_id: str | None, name: str | None, ui_url: Callable[[str], str | None]) -> str:
    if run_id is None:
        return "not created"
    label = name or run_id[:8]
    url = ui_url(run_id)
    return f"[{label}]({url})" if url else label


def _cell(text: str) -> str:
    """``text`` on one line, safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")[:500]
