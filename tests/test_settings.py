"""Settings precedence: flags > FLOWSUBMIT_* environment > TOML file > defaults (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from flowsubmit.settings import Settings


def test_flags_win_over_env_which_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each source overrides the ones below it, field by field."""
    config = tmp_path / "flowsubmit.toml"
    config.write_text('poll_interval_s = 9.0\nmax_concurrent_jobs = 3\nlog_format = "console"\n')
    monkeypatch.setenv("FLOWSUBMIT_POLL_INTERVAL_S", "7.5")
    monkeypatch.setenv("FLOWSUBMIT_MAX_CONCURRENT_JOBS", "4")

    settings = Settings.load(config, max_concurrent_jobs="5", log_level=None)

    assert settings.max_concurrent_jobs == 5  # flag
    assert settings.poll_interval_s == 7.5  # env
    assert settings.log_format == "console"  # file
    assert settings.log_level == "info"  # default


def test_unknown_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    """A typo in the TOML file is refused, not silently ignored."""
    config = tmp_path / "flowsubmit.toml"
    config.write_text("pol_interval_s = 1\n")
    with pytest.raises(ValidationError, match="pol_interval_s"):
        Settings.load(config)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist fails clearly."""
    with pytest.raises(FileNotFoundError, match="config file not found"):
        Settings.load(tmp_path / "nope.toml")
