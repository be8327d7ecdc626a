"""`$SPARKGRID_HOME`: where sparkgrid keeps its state on a machine, and what is in it.

The home directory (default `~/.sparkgrid`) holds `up.json`, the file a running `sparkgrid up`
writes (endpoint, API key, Redis URL, Ray address, ...; mode 0600), its lock, the private
Redis's data, the SPS caches and the tiny demo pair. Every reader of `up.json` goes through
`read_up_file`.

Knows: paths and the up.json file. Does not know: what wrote it or what the values mean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HOME_ENV = "SPARKGRID_HOME"
UP_FILE = "up.json"


def home() -> Path:
    """Where sparkgrid keeps its state: `$SPARKGRID_HOME`, default `~/.sparkgrid`."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".sparkgrid")


def up_file(where: Path | None = None) -> Path:
    return (where or home()) / UP_FILE


def read_up_file(where: Path | None = None) -> dict:
    """What a running `sparkgrid up` wrote; {} when there is none (or it is unreadable: a
    stack that is starting or stopping)."""
    try:
        info = json.loads(up_file(where).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_up_file(info: dict, where: Path | None = None) -> Path:
    """Write `info` as up.json, readable by its owner only (it holds secrets)."""
    path = up_file(where)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2)
    return path


def shown(path) -> str:
    """A path for humans: under the user's home directory as `~/...`."""
    path, user_home = Path(path).absolute(), Path.home()
    return f"~/{path.relative_to(user_home)}" if path.is_relative_to(user_home) else str(path)
