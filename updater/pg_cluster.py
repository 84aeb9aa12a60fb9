"""A throwaway PostgreSQL server for the fleet's tests and benchmarks.

``initdb`` in a new temporary folder, the server on 127.0.0.1 at a free port with its
Unix socket in that folder, trust authentication for local connections only; stopped
and removed after. The binaries are Debian's (``/usr/lib/postgresql/<N>/bin``, package
``postgresql``), or those in $OUTPOST_PG_BIN, or ``initdb`` on the PATH. PostgreSQL will
not run as root: as root the server runs as the ``postgres`` user the package makes
(``runuser``), and the folder is handed to it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

RUN_AS = "postgres"


def find_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    candidates = []
    if os.environ.get("OUTPOST_PG_BIN"):
        candidates.append(Path(os.environ["OUTPOST_PG_BIN"]))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    candidates += reversed(debian)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def unavailable() -> str | None:
    """Why no throwaway server can be started here, or None."""
    if find_bin() is None:
        return ("no PostgreSQL server binaries (initdb, pg_ctl, postgres): apt-get install "
                "-y postgresql, or set OUTPOST_PG_BIN to their folder")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return (f"running as root, and PostgreSQL refuses root; there is no "
                    f"'{RUN_AS}' user to run it as (Debian's postgresql package makes one)")
        if shutil.which("runuser") is None:
            return "running as root, and there is no runuser to start PostgreSQL as postgres"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One throwaway server. ``settings``: extra ``postgres -c`` settings (the tests turn
    fsync off: they kill fleet servers, never the database's host)."""

    def __init__(self, settings: dict[str, str] | None = None):
        why = unavailable()
        if why is not None:
            raise RuntimeError(why)
        self.bin = find_bin()
        self.settings = settings or {}
        self.root = Path(tempfile.mkdtemp(prefix="outpost-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "outpost", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        out = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-1500:]}")
        return out

    def start(self) -> LocalPostgres:
        options = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                   "unix_socket_directories": str(self.root), **self.settings}
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(f"-c {k}={v}" for k, v in options.items()), "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: sessions are cut, as when a database is lost)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://outpost@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg  # noqa: PLC0415

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
