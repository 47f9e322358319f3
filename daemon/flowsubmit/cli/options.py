"""The options several subcommands share (``--debug``, ``--queue``, ``--config``, the settings flags), and the settings they make."""

from __future__ import annotations

import argparse
from pathlib import Path

from flowsubmit.cli.errors import Parser
from flowsubmit.settings import Settings

__all__ = ["add_config", "add_settings_flags", "common", "load_settings", "queue_options"]


def common() -> Parser:
    """Options every subcommand takes (and ``flowsubmit`` itself)."""
    options = Parser(add_help=False)
    options.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the Python traceback too",
    )
    return options


def queue_options() -> Parser:
    """``--queue`` and ``--config``, for every subcommand that works on a queue."""
    options = Parser(add_help=False)
    options.add_argument(
        "--queue",
        type=Path,
        metavar="DIR",
        help="the queue directory (default: $FLOWSUBMIT_QUEUE, or `queue` in the --config file)",
    )
    add_config(options)
    return options


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the TOML file of settings."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file of settings (docs/cli.md)"
    )


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, with the field's description as help (one source of truth)."""
    group = parser.add_argument_group(
        "settings (also FLOWSUBMIT_<NAME> and the --config TOML file)"
    )
    for name, setting in Settings.model_fields.items():
        if name in ("queue", "producers"):  # producers: TOML tables (or JSON in the env) only
            continue
        flag = "--" + name.replace("_", "-")
        if setting.annotation == list[str]:  # repeat the flag: --allowed-deployments 'etl/*' ...
            group.add_argument(
                flag, dest=name, action="append", help=f"{setting.description} Repeatable."
            )
        elif setting.annotation is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=setting.description,
            )
        else:
            group.add_argument(
                flag,
                dest=name,
                default=None,
                metavar=name.upper(),
                help=f"{setting.description} (default: {setting.default})",
            )


def load_settings(args: argparse.Namespace) -> Settings:
    """The settings from the flags this command has, the environment and ``--config``."""
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings.load(getattr(args, "config", None), **flags)
