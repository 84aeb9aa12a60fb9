"""A real `outpost serve --http` process for the HTTP tests, and where it listens."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from appliance.demo.launcher import ServerProcess
from appliance.models.repository import Repository


def http_url(proc: ServerProcess, timeout_s: float = 10.0) -> str:
    """The HTTP base URL from the server's "ready" log line (it binds port 0)."""
    return proc.ready_record(timeout_s)["http"]


def start_http_server(data_dir: Path, demo_files: dict[str, Path],
                      http_config: dict | None = None) -> tuple[ServerProcess, str]:
    """Repository with the demo models, a config file with [http], the server running."""
    data_dir.mkdir(parents=True, exist_ok=True)
    repo = Repository(data_dir)
    for name, path in demo_files.items():
        repo.add(name, path)
    repo.close()
    lines = ["[http]", 'address = "127.0.0.1:0"']
    for key, value in (http_config or {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    config = data_dir / "outpost.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = ServerProcess(data_dir, extra_args=["--config", str(config)]).start()
    return proc, http_url(proc)


def served_http(demo_files: dict[str, Path], http_config: dict | None = None):
    """For a fixture to ``yield from``: a server with the demo models and [http] in a
    folder of its own, as (process, split URL); stopped cleanly afterwards, and gone."""
    data_dir = Path(tempfile.mkdtemp(prefix="op-"))
    proc, url = start_http_server(data_dir, demo_files, http_config)
    yield proc, urlsplit(url)
    code = proc.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"
