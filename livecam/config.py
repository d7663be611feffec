"""Your defaults for the commands, in $XDG_CONFIG_HOME/livecam/config.toml ($LIVECAM_CONFIG).

One table per command, keys named like its options (dashes or underscores):

    [start]
    avatar = "me"
    device = "USB"
    virtual-mic = true

Flags given on the command line win over the file. An unknown command or option is an error
that names the file and the key, so a typo never goes unnoticed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from livecam.paths import config_home

CONFIG_ENV = "LIVECAM_CONFIG"


class ConfigError(Exception):
    """The config file cannot be used; the message names the file and what is wrong."""


def config_path() -> Path:
    if env := os.environ.get(CONFIG_ENV):
        return Path(env)
    return config_home() / "livecam" / "config.toml"


def load_config(path: Path, options: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    """{command: {option: value}} from the file (empty when there is none). `options` maps
    each command that may be configured to the names of its options."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    out: dict[str, dict[str, Any]] = {}
    for command, table in data.items():
        if command not in options or not isinstance(table, dict):
            raise ConfigError(
                f"{path}: [{command}] is not a command table; use one of "
                + ", ".join(f"[{name}]" for name in sorted(options))
            )
        out[command] = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in options[command]:
                raise ConfigError(
                    f"{path}: [{command}] has no option {key!r}; see `livecam {command} --help`"
                )
            out[command][name] = value
    return out
