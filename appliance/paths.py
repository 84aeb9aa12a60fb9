"""Where things are by default: the data folder, the socket, and this outpost's command."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_data_dir() -> Path:
    if os.environ.get("OUTPOST_DATA_DIR"):
        return Path(os.environ["OUTPOST_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "outpost"


def default_socket_path(data_dir: Path) -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "outpost" / "outpost.sock"
    return data_dir / "outpost.sock"


def outpost_command() -> list[str]:
    """How to run this same outpost: the frozen executable, or this Python's module."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "appliance"]
