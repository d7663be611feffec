"""The XDG base directories livecam keeps its files under (each use adds its own override)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, default: str) -> Path:
    value = os.environ.get(variable, "")
    # the spec says a relative path is invalid and must be ignored
    return Path(value) if os.path.isabs(value) else Path.home() / default


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config")


def cache_home() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache")


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share")
