"""Crash consistency: SIGKILL the device process at each step of an update, restart it,
and check it serves a complete verified version, finishes or rolls back, loses nothing.

The agent kills itself at the step named by OUTPOST_UPDATER_FAULT, so each kill point
is deterministic.
"""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from tests.support.updater_support import (
    active_version,
    fleet_offering,
    journal_notes,
    make_device,
    wait_done,
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_files):
    # The release is ~10 KB and the devices read 4 KiB chunks: mid-download is real.
    yield from fleet_offering(tmp_path_factory.mktemp("fleet") / "fleet",
                              demo_files["identity"])


def _kill_at(point: str, data_dir, config) -> None:
    """Run `outpost serve` until the agent SIGKILLs itself at ``point``."""
    device = ServerProcess(data_dir, extra_args=["--config", str(config)])
    log = open(data_dir / "killed.log", "wb")
    proc = subprocess.Popen(device.args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OUTPOST_UPDATER_FAULT": point})
    try:
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert code == -signal.SIGKILL, (data_dir / "killed.log").read_text()[-2000:]


def _serves(device: ServerProcess) -> int:
    with Client(device.socket_path) as c:
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        r = c.infer("identity", {"x": x})
        np.testing.assert_array_equal(r.outputs["y"], x)
        return r.version


@pytest.mark.parametrize("point", ["download-mid", "download-done", "stage-mid",
                                   "stage-stored", "prepare-mid", "activate-done",
                                   "watch-mid"])
def test_killed_update_resumes_and_finishes(fleet, short_tmp, demo_files, point):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], window_s=1.0)
    _kill_at(point, data, config)
    assert active_version(data) in (1, 2)
    with ServerProcess(data, extra_args=["--config", str(config)]) as device:
        assert _serves(device) in (1, 2)  # a complete version serves from the first request
        row = wait_done(data, 2)
        assert row["outcome"] == "committed", row
        assert _serves(device) == 2
    assert active_version(data) == 2
    assert not list((data / "staging" / "downloads").iterdir())  # nothing left behind
    if point == "download-mid":
        assert any(n.startswith("resuming the download at byte") for n in journal_notes(data))


def test_repeated_crash_during_health_watch_rolls_back(fleet, short_tmp, demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], window_s=1.0,
                         extra="max_watch_restarts = 0\n")
    _kill_at("watch-mid", data, config)
    with ServerProcess(data, extra_args=["--config", str(config)]) as device:
        row = wait_done(data, 2)
        assert row["outcome"] == "rolled_back" and "restarted" in row["detail"], row
        assert _serves(device) == 1
    assert active_version(data) == 1


@pytest.mark.parametrize("point", ["stage-mid", "stage-stored", "prepare-mid"])
def test_first_install_killed_before_validation_serves_nothing_unvalidated(
        fleet, short_tmp, demo_files, point):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], installed=False)
    _kill_at(point, data, config)
    assert active_version(data) is None  # staged at most, never active unvalidated
    with ServerProcess(data, extra_args=["--config", str(config)]) as device:
        row = wait_done(data, 2)
        assert row["outcome"] == "committed", row
        assert _serves(device) == 2
    assert active_version(data) == 2
