"""Settings precedence: flags > FLOWSUBMIT_* environment > TOML file > defaults (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowsubmit.errors import SettingsError
from flowsubmit.settings import Settings
from tests.support.daemons import settings_env


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
    """A typo in the TOML file is refused, naming the file, the key and the closest known key."""
    config = tmp_path / "flowsubmit.toml"
    config.write_text("pol_interval_s = 1\n")
    with pytest.raises(SettingsError) as caught:
        Settings.load(config)
    assert (caught.value.source, caught.value.reason, caught.value.hint) == (
        f"{config}: pol_interval_s",
        "unknown setting",
        "did you mean 'poll_interval_s'?",
    )


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """--config naming a file that does not exist fails clearly."""
    with pytest.raises(SettingsError) as caught:
        Settings.load(tmp_path / "nope.toml")
    assert str(caught.value) == f"--config {tmp_path / 'nope.toml'}: no such file"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("flag", "--max-concurrent-jobs: must be at least 1, not '0'"),
        ("env", "FLOWSUBMIT_MAX_CONCURRENT_JOBS: must be at least 1, not '0'"),
        ("file", "{config}: max_concurrent_jobs: must be at least 1, not 0"),
    ],
)
def test_a_bad_value_names_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    """A bad value is reported with the flag, variable or file and key it came from."""
    config = tmp_path / "flowsubmit.toml"
    config.write_text("max_concurrent_jobs = 0\n" if source == "file" else "")
    if source == "env":
        monkeypatch.setenv("FLOWSUBMIT_MAX_CONCURRENT_JOBS", "0")
    flags = {"max_concurrent_jobs": "0"} if source == "flag" else {}
    with pytest.raises(SettingsError) as caught:
        Settings.load(config, **flags)
    assert str(caught.value) == message.format(config=config)


def test_the_test_daemons_settings_reach_them_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """``settings_env`` (how tests pass settings to a daemon) spells lists, rules, booleans, numbers, strings and paths so that the environment source reads each back as given; None has no spelling."""
    given = {
        "allowed_deployments": ["driven/*", "vault/*"],
        "producers": [{"user": "etl", "allowed_deployments": ["driven/*"]}],
        "force_polling": True,
        "max_concurrent_jobs": 4,
        "poll_interval_s": 0.5,
        "run_tag": "secrets-test",
        "queue": Path("/srv/queue"),
    }
    expected = Settings(**given).model_dump()
    for name, value in settings_env(given).items():
        monkeypatch.setenv(name, value)

    assert Settings().model_dump() == expected
    with pytest.raises(TypeError, match="metrics_port: None has no FLOWSUBMIT_\\* spelling"):
        settings_env({"metrics_port": None})
