"""The status screen's progress bar: green for succeeded runs, red for failed ones (pure rendering)."""

from __future__ import annotations

from flowsubmit.ops.status import BAR_WIDTH, progress_bar


def _parts(runs: dict[str, int | None], total: int | None) -> list[tuple[str, int]]:
    bar = progress_bar(runs, total)
    return [(str(span.style), span.end - span.start) for span in bar.spans if span.end > span.start]


def test_the_bar_shows_succeeded_green_failed_red_and_the_rest_grey() -> None:
    """12 runs: 6 succeeded, 3 failed, 3 not final: half green, a quarter red, a quarter grey."""
    runs = {"succeeded": 6, "failed": 3, "cancelled": 0}
    assert _parts(runs, 12) == [("green", 12), ("red", 6), ("grey37", 6)]
    assert len(progress_bar(runs, 12).plain) == BAR_WIDTH


def test_a_job_that_failed_entirely_has_a_red_bar() -> None:
    """Failures fill the bar too: a job whose runs all failed is all red, not empty."""
    assert _parts({"succeeded": 0, "failed": 4, "cancelled": 0}, 4) == [("red", 24)]


def test_unknown_counts_draw_an_empty_bar() -> None:
    """Another producer's job (counts and total unknown): a grey bar."""
    assert _parts({"succeeded": None, "failed": None, "cancelled": None}, None) == [("grey37", 24)]
