"""Where things are: the default data folder and socket, HOST:PORT addresses, and the
command that runs this same outpost."""

from __future__ import annotations

import ipaddress
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


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{key} {text!r} must be HOST:PORT, like 127.0.0.1:7070")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
