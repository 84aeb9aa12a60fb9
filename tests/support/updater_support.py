"""Shared pieces of the updater tests: a fleet (repository + real `outpost fleet serve`
process on 127.0.0.1), device data dirs and configs, and waiting on a device's journal."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from appliance.demo.models import save_model
from appliance.models.repository import Repository
from updater.fleet_repo import FleetRepo, init_repo
from updater.ingest_load import wait_listening
from updater.validation import make_release_samples

OUTPOST = [sys.executable, "-m", "appliance"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_outpost(*args: str, env: dict | None = None, timeout: float = 120
                ) -> subprocess.CompletedProcess:
    return subprocess.run([*OUTPOST, *map(str, args)], check=False, capture_output=True,
                          text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def nan_model(path: Path, width: int = 16) -> Path:
    """Like the demo identity model, but y = x + log(-1): NaN everywhere."""
    k = numpy_helper.from_array(np.full((width,), -1.0, np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Log", ["k"], ["l"]), helper.make_node("Add", ["x", "l"], ["y"])],
        "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[k])
    return save_model(graph, path)


class Fleet:
    """A fleet repository and, once started, its real fleet server process."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        init_repo(self.dir)
        self.repo = FleetRepo(self.dir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> Path:
        return self.dir / "metadata" / "1.root.json"

    def device_key_file(self, device_id: str, folder: Path) -> Path:
        """The device's report key, written as `outpost fleet device-key --out` does."""
        from updater.report_auth import device_key

        path = Path(folder) / "report.key"
        path.write_text(device_key(self.repo.report_secret(), device_id).hex() + "\n")
        return path

    def publish(self, name: str, version: int, model: Path, samples: Path | None = None):
        with tempfile.TemporaryDirectory() as tmp:
            config, samples_out = make_release_samples(model, None, samples, Path(tmp))
            return self.repo.publish(name, version, model, config, samples_out)

    def start(self, *extra: str) -> Fleet:
        self.log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [*OUTPOST, "fleet", "serve", str(self.dir), "--port", str(self.port), *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, self.dir / "server.log", 30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self.log.close()
        self.proc = None


def fleet_offering(directory: Path, model: Path, version: int = 2):
    """For a fixture to ``yield from``: a fleet that offers ``identity`` ``version`` (the
    release made from ``model``) to every device, its real server running; stopped after."""
    f = Fleet(directory)
    f.publish("identity", version, model)
    f.repo.set_rollout("identity", version, new=True, fraction=1.0)
    f.start()
    yield f
    f.stop()


def make_device(data_dir: Path, fleet: Fleet, model_file: Path, *, device_id: str = "dev-1",
                labels: dict | None = None, window_s: float = 0.3, poll_s: float = 0.2,
                extra: str = "", installed: bool = True) -> Path:
    """A device data dir holding `identity` version 1 (active, unless ``installed`` is
    False: a device that has never had the model) and its config file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    repo = Repository(data_dir)
    if installed:
        repo.add("identity", model_file, version=1)
    repo.close()
    label_lines = "".join(f'{k} = "{v}"\n' for k, v in (labels or {}).items())
    key_file = fleet.device_key_file(device_id, data_dir)
    config = data_dir / "outpost.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\n'
        f'[logging]\nlevel = "info"\n'
        f'[updater]\nfleet_url = "{fleet.url}"\ntrusted_root = "{fleet.root}"\n'
        f'device_id = "{device_id}"\nreport_key_file = "{key_file}"\n'
        f'poll_interval_s = {poll_s}\npoll_jitter_s = 0.0\n'
        f'health_window_s = {window_s}\ndownload_chunk_bytes = 4096\n{extra}'
        f'[updater.labels]\n{label_lines}')
    return config


def active_version(data_dir: Path, model: str = "identity") -> int | None:
    with sqlite3.connect(data_dir / "state.db") as db:
        row = db.execute("select active_version from models where name = ?", [model]).fetchone()
    return row[0] if row else None


def journal_rows(data_dir: Path) -> list[dict]:
    with sqlite3.connect(data_dir / "state.db") as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("select * from update_journal order by id")]
        except sqlite3.OperationalError:
            return []


def journal_notes(data_dir: Path) -> list[str]:
    with sqlite3.connect(data_dir / "state.db") as db:
        return [r[0] for r in db.execute("select detail from update_steps order by id")]


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_done(data_dir: Path, version: int, timeout_s: float = 30.0) -> dict:
    """The journal row of the update to ``version`` once it has ended."""
    def done():
        rows = [r for r in journal_rows(data_dir) if r["version"] == version]
        return rows[-1] if rows and rows[-1]["step"] == "done" else None
    return wait_for(done, timeout_s, f"update to {version} to finish")


def batch_one_model(path: Path, width: int = 16) -> Path:
    """y = reshape(x, [1, width]): right for one row, a runtime error for more."""
    shape = numpy_helper.from_array(np.array([1, width], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "batch_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[shape])
    return save_model(graph, path)
