"""A real device (`outpost serve` with [updater]) against a real fleet server: take a
rollout, refuse a release that fails validation, fall back when the fleet halts, and
queue reports while the fleet can't be reached."""

from __future__ import annotations

import contextlib
import sqlite3
import time

import numpy as np
import pytest

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from appliance.errors import OutpostError
from tests.support.updater_support import (
    Fleet,
    active_version,
    batch_one_model,
    journal_rows,
    make_device,
    nan_model,
    run_outpost,
    wait_done,
    wait_for,
)
from updater.validation import random_inputs, write_samples


@pytest.fixture
def fleet(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 1, demo_files["identity"])
    f.repo.set_rollout("identity", 1, new=True, fraction=1.0)
    f.publish("identity", 2, demo_files["identity"])
    f.start()
    yield f
    f.stop()


def _served_version(device: ServerProcess) -> int:
    x = np.ones((1, 16), np.float32)
    with Client(device.socket_path) as c:
        return c.infer("identity", {"x": x}).version


def test_rollout_validation_failure_and_halt_fallback(fleet, short_tmp, demo_files, tmp_path):
    config = make_device(short_tmp / "dev", fleet, demo_files["identity"])
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    with ServerProcess(short_tmp / "dev", extra_args=["--config", str(config)]) as device:
        row = wait_done(short_tmp / "dev", 2)
        assert row["outcome"] == "committed", row
        assert _served_version(device) == 2

        # A release whose outputs are NaN fails validation: marked bad, never served.
        x = random_inputs([type("S", (), {"name": "x", "dtype": "float32",
                                          "shape": (-1, 16)})()])
        write_samples(tmp_path / "samples.npz", x, {"y": x["x"]})
        fleet.publish("identity", 3, nan_model(tmp_path / "nan.onnx"),
                      samples=tmp_path / "samples.npz")
        fleet.repo.set_rollout("identity", 3, new=True, fraction=1.0)
        row = wait_done(short_tmp / "dev", 3)
        assert row["outcome"] == "failed" and "non-finite" in row["detail"], row
        assert _served_version(device) == 2

        # The fleet halts 2: the device falls back to 1, the highest that qualifies.
        fleet.repo.set_rollout("identity", 2, state="halted")
        wait_for(lambda: active_version(short_tmp / "dev") == 1, 30, "fallback to 1")
        wait_for(lambda: _served_version(device) == 1, 10, "serving version 1")

    with sqlite3.connect(short_tmp / "dev" / "state.db") as db:
        states = dict(db.execute("select version, state from versions where model = "
                                 "'identity'").fetchall())
    assert states == {1: "ready", 2: "ready", 3: "bad"}
    status = run_outpost("fleet", "status", fleet.dir)
    assert "identity 3: active at 100.0%" in status.stdout
    assert "failed 1" in status.stdout and "committed 1" in status.stdout


def test_reports_queue_while_the_fleet_is_unreachable(fleet, short_tmp, demo_files):
    dead = f"http://127.0.0.1:{fleet.port + 1 if fleet.port < 65535 else 1}"
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], extra=f'report_url = "{dead}"\n')
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 0, out.stderr
    assert "identity 1 -> 2: committed" in out.stdout
    with sqlite3.connect(data / "state.db") as db:
        queued = db.execute("select count(*) from update_reports").fetchone()[0]
    assert queued >= 5  # downloading ... committed, all still here
    assert "devices" not in run_outpost("fleet", "status", fleet.dir).stdout.split("identity 2")[1]
    config.write_text(config.read_text().replace(f'report_url = "{dead}"\n', ""))
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 0 and "up to date" in out.stdout, out.stderr
    with sqlite3.connect(data / "state.db") as db:
        assert db.execute("select count(*) from update_reports").fetchone()[0] == 0
    assert "committed 1" in run_outpost("fleet", "status", fleet.dir, "identity").stdout


def test_bad_updater_config_is_one_clear_error(fleet, short_tmp, demo_files):
    config = make_device(short_tmp / "dev", fleet, demo_files["identity"],
                         extra="poll_every = 3\n")
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 2
    assert "unknown key 'updater.poll_every'" in out.stderr and "Traceback" not in out.stderr


def test_health_watch_rolls_back_a_version_that_fails_requests(fleet, short_tmp, demo_files,
                                                               tmp_path):
    """v3 passes validation (one-row samples) but fails every two-row request it serves."""
    x = np.ones((1, 16), np.float32)
    write_samples(tmp_path / "samples.npz", {"x": x}, {"y": x})
    fleet.publish("identity", 3, batch_one_model(tmp_path / "b1.onnx"),
                  samples=tmp_path / "samples.npz")
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], window_s=2.0)
    fleet.repo.set_rollout("identity", 3, new=True, fraction=1.0)
    two = np.ones((2, 16), np.float32)
    with ServerProcess(data, extra_args=["--config", str(config)]) as device:
        with Client(device.socket_path) as c:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # steady traffic, across the swap
                with contextlib.suppress(OutpostError):
                    c.infer("identity", {"x": two})
                rows = [r for r in journal_rows(data) if r["version"] == 3]
                if rows and rows[-1]["step"] == "done":
                    break
                time.sleep(0.02)
        row = wait_done(data, 3, 1)
        assert row["outcome"] == "rolled_back" and "error rate" in row["detail"], row
        assert _served_version(device) == 1
    assert active_version(data) == 1
    assert "rolled_back 1" in run_outpost("fleet", "status", fleet.dir, "identity").stdout


def test_update_check_swaps_a_running_server_over_its_socket(fleet, short_tmp, demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"])
    # The server runs without [updater]; `update check` beside it drives the update.
    config.write_text(config.read_text().replace(
        "[logging]", f'[server]\nsocket_path = "{data / "outpost.sock"}"\n[logging]'))
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    with ServerProcess(data) as device:
        assert _served_version(device) == 1
        out = run_outpost("update", "check", "--config", config)
        assert out.returncode == 0 and "identity 1 -> 2: committed" in out.stdout, out.stderr
        assert _served_version(device) == 2  # swapped in the running server, no restart
    assert active_version(data) == 2
