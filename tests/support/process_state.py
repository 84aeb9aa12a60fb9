"""What a real server process holds, read from outside it: open descriptors, resident
memory, its JSON log lines."""

from __future__ import annotations

import json
import os

from appliance.demo.launcher import ServerProcess


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def log_records(proc: ServerProcess) -> list[dict]:
    """Every JSON line of the server's log so far (other lines skipped)."""
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
