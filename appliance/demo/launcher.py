"""Start `outpost serve` as a child process and wait until it answers; stop it cleanly.

Used by `outpost demo`, the benchmarks and the tests, so each of them talks to the real
server over a real socket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from appliance.errors import OutpostError, Unauthenticated, Unavailable
from appliance.paths import outpost_command


class ServerProcess:
    def __init__(self, data_dir: Path, socket_path: Path | None = None, *,
                 extra_args: list[str] | None = None, env: dict | None = None,
                 log_path: Path | None = None, command: list[str] | None = None,
                 cwd: Path | None = None):
        self.data_dir = Path(data_dir)
        self.socket_path = Path(socket_path or self.data_dir / "outpost.sock")
        self.args = [*(command or outpost_command()), "serve", "--data-dir",
                     str(self.data_dir), "--socket", str(self.socket_path),
                     "--log-format", "json", *(extra_args or [])]
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path or self.data_dir / "server.log")
        # `python -m appliance` imports the appliance/ of its working folder first, whatever
        # PYTHONPATH says: a server from another code tree must start in that tree.
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        from appliance.client import Client  # noqa: PLC0415

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log_start = self._log.tell()  # this run's lines follow an earlier run's
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, stdin=subprocess.DEVNULL, cwd=self.cwd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"the server exited with {self.proc.returncode} before it "
                                  f"was ready; its log: {self.log_path}\n{self.log_tail()}")
            try:
                with Client(self.socket_path, timeout_s=5) as c:
                    c.health()
                return self
            except Unauthenticated:  # it answers; it wants a token first
                return self
            except OutpostError:
                time.sleep(0.05)
        self.kill()
        raise Unavailable(f"the server was not ready within {timeout_s} s; its log: "
                          f"{self.log_path}\n{self.log_tail()}")

    def ready_record(self, timeout_s: float = 10.0) -> dict:
        """This run's "ready" log line (JSON): where it listens, what it loaded."""
        import json

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                lines = f.read().decode(errors="replace").splitlines()
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("msg") == "ready":
                    return record
            time.sleep(0.05)
        raise Unavailable(f"no ready line in {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
