"""Shadow-verified releases with the real pieces: a real fleet server process, a real
`outpost serve` whose agent takes the rollout, and live traffic over the socket. A
candidate shadows the active version and answers only if it agreed; one that disagrees
(or answers with other outputs) never answers a request."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from appliance.demo.models import save_model
from appliance.errors import OutpostError
from tests.support import tiny_models as tm
from tests.support.updater_support import (
    Fleet,
    active_version,
    journal_notes,
    journal_rows,
    make_device,
    run_outpost,
    wait_done,
    wait_for,
)
from updater.fleet_db import FleetDB
from updater.shadow import ShadowPolicy

WIDTH = 16


def plus_one_model(path):
    """y = x + 1: passes its own samples, disagrees with the identity on every request."""
    one = numpy_helper.from_array(np.ones((WIDTH,), np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "plus_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=[one])
    return save_model(graph, path)


def renamed_output_model(path):
    """The identity, but its output is called 'z': the live answers name 'y'."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])], "renamed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", WIDTH])])
    return save_model(graph, path)


class Traffic:
    """Live requests in a loop from a thread; every answer's version is kept."""

    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.versions: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        x = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
        with Client(self.socket_path) as c:
            while not self.stop.is_set():
                with contextlib.suppress(OutpostError):
                    r = c.infer("identity", {"x": x})
                    np.testing.assert_array_equal(r.outputs["y"], x)
                    self.versions.append(r.version)
                self.stop.wait(0.005)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


def _shadow_rollout(fleet, version, *, window_s=1.0, min_requests=20, **limits):
    fleet.repo.set_rollout("identity", version, new=True, fraction=1.0,
                           shadow=ShadowPolicy(window_s, min_requests, **limits))


def _device_states(fleet, version):
    db = FleetDB(fleet.dir / "fleet.db")
    try:
        return [dict(r) for r in db.db.query(
            "select state, detail from reports where version = ? order by id", [version])]
    finally:
        db.close()


@pytest.fixture
def fleet(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 1, demo_files["identity"])
    f.repo.set_rollout("identity", 1, new=True, fraction=1.0)
    f.publish("identity", 2, demo_files["identity"])
    f.publish("identity", 3, plus_one_model(tmp_path / "plus1.onnx"))
    f.publish("identity", 4, renamed_output_model(tmp_path / "renamed.onnx"))
    f.publish("identity", 5, tm.wrong_width(tmp_path / "narrow.onnx"))
    f.start()
    yield f
    f.stop()


def test_agreeing_candidate_answers_only_after_its_shadow_phase_disagreeing_ones_never(
        fleet, short_tmp, demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], window_s=0.3)
    with ServerProcess(data, extra_args=["--config", str(config)]) as device, \
            Traffic(device.socket_path) as traffic:
        # v3 disagrees on every request: it shadows, is rejected, never answers.
        _shadow_rollout(fleet, 3)
        row = wait_done(data, 3)
        assert row["outcome"] == "rejected_in_shadow", row
        assert "disagreement 100.0%" in row["detail"], row
        assert 3 not in traffic.versions and traffic.versions.count(1) >= 20
        # v4 answers with an output the live version does not have, v5 with 8 columns
        # where the live one has 16: reported, not crashed.
        for version in (4, 5):
            _shadow_rollout(fleet, version)
            row = wait_done(data, version)
            assert row["outcome"] == "rejected_in_shadow", row
        assert set(traffic.versions) == {1}
        # v2 agrees: it answers only once its window and request count are met.
        _shadow_rollout(fleet, 2, max_latency_ratio=20.0)  # not what this test is about
        row = wait_done(data, 2)
        assert row["outcome"] == "committed", (row, journal_notes(data)[-3:])
        seen = len(traffic.versions)
        wait_for(lambda: len(traffic.versions) > seen + 5, 10, "traffic after the swap")
    assert set(traffic.versions) == {1, 2}
    first_v2 = traffic.versions.index(2)
    assert set(traffic.versions[first_v2:]) == {2}  # no way back once activated
    assert active_version(data) == 2
    steps = [r["step"] for r in journal_rows(data)]
    assert steps.count("done") == 4
    notes = journal_notes(data)
    assert any(n.startswith("shadow passed: agreed on") for n in notes)

    reports = _device_states(fleet, 3)
    assert [r["state"] for r in reports][-1] == "rejected_in_shadow"
    assert "shadowing" in [r["state"] for r in reports]
    assert "activated" not in [r["state"] for r in reports]
    renamed = _device_states(fleet, 4)[-1]
    assert renamed["state"] == "rejected_in_shadow"
    assert "missing_output" in renamed["detail"], renamed
    narrow = _device_states(fleet, 5)[-1]
    assert narrow["state"] == "rejected_in_shadow" and "shape_mismatch" in narrow["detail"]
    states = [r["state"] for r in _device_states(fleet, 2)]
    assert states[states.index("shadowing"):] == ["shadowing", "shadow_passed", "activated",
                                                  "committed"], states
    status = run_outpost("fleet", "status", fleet.dir, "identity")
    assert "identity 3: active at 100.0%" in status.stdout, status.stdout
    assert "rejected_in_shadow 1" in status.stdout
    assert "1 devices (passed 0, rejected 1," in status.stdout.split("identity 3:")[1]
    assert "disagreement 100.0%" in status.stdout.split("identity 3:")[1]


def test_a_device_killed_in_the_shadow_phase_starts_the_window_again(fleet, short_tmp,
                                                                     demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], window_s=0.3)
    _shadow_rollout(fleet, 2, window_s=1.0, min_requests=10, max_latency_ratio=20.0)
    device = ServerProcess(data, extra_args=["--config", str(config)])
    log = open(data / "killed.log", "wb")
    proc = subprocess.Popen(device.args, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OUTPOST_UPDATER_FAULT": "shadow-mid"})
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert code == -signal.SIGKILL, (journal_rows(data), journal_notes(data),
                                     (data / "killed.log").read_text()[-3000:])
    assert [r["step"] for r in journal_rows(data)] == ["shadow"]
    assert active_version(data) == 1
    with ServerProcess(data, extra_args=["--config", str(config)]) as device, \
            Traffic(device.socket_path) as traffic:
        row = wait_done(data, 2)
    assert row["outcome"] == "committed", (row["detail"], journal_notes(data))
    assert traffic.versions[0] == 1
    assert any("restarted during the shadow phase: the window starts again" in n
               for n in journal_notes(data))


def test_without_traffic_a_candidate_stays_in_shadow_and_says_so(fleet, short_tmp,
                                                                 demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"])
    _shadow_rollout(fleet, 2, window_s=0.5, min_requests=5)
    # No server: nothing gives it live traffic.
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 0, out.stderr
    assert "identity 1 -> 2: in shadow (no server runs here to give it live traffic" \
        in out.stdout, out.stdout
    # A server beside the command, but no requests: the window passes without evidence.
    config.write_text(config.read_text().replace(
        "[logging]", f'[server]\nsocket_path = "{data / "outpost.sock"}"\n[logging]'))
    with ServerProcess(data) as device:
        out = run_outpost("update", "check", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "identity 1 -> 2: in shadow (0 of 5 requests after 1s of 0.5s; waiting for " \
               "live traffic" in out.stdout, out.stdout
        with Client(device.socket_path) as c:
            assert c.infer("identity", {"x": np.ones((1, WIDTH), np.float32)}).version == 1
    assert [r["step"] for r in journal_rows(data)] == ["shadow"]
    assert active_version(data) == 1
    states = [r["state"] for r in _device_states(fleet, 2)]
    assert states.count("shadow_waiting") == 2 and "activated" not in states
    waiting = _device_states(fleet, 2)[-1]["detail"]
    assert waiting.startswith("0 of 5 requests"), waiting
    # The fleet halts the rollout: the device abandons the shadow phase cleanly.
    fleet.repo.set_rollout("identity", 2, state="halted")
    out = run_outpost("update", "check", "--config", config)
    assert "identity 2: abandoned (no longer offered)" in out.stdout, out.stdout
    assert journal_rows(data)[-1]["outcome"] == "abandoned"


def test_a_model_not_served_yet_skips_the_shadow_phase_and_says_so(fleet, short_tmp,
                                                                   demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"], installed=False)
    _shadow_rollout(fleet, 2)
    fleet.repo.set_rollout("identity", 1, state="halted")
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 0 and "identity None -> 2: committed" in out.stdout, out.stdout
    skipped = [r for r in _device_states(fleet, 2) if r["state"] == "shadow_skipped"]
    assert skipped and "not served here yet: no active version to compare with" in \
        skipped[0]["detail"]
    assert active_version(data) == 2


def test_a_rollout_signed_with_a_limit_out_of_range_is_not_taken_and_said(fleet, short_tmp,
                                                                          demo_files):
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"])
    _shadow_rollout(fleet, 2)
    # Another tool signed the rollout with a shadow_sample of 0: nothing would be copied.
    repo = fleet.repo
    targets = dict(repo._load("targets").signed.targets)
    tf = targets["releases/identity/2.tar"]
    rollout = {**tf.custom["rollout"]}
    rollout["shadow"] = {**rollout["shadow"], "sample": "0.0"}
    tf.unrecognized_fields["custom"] = {**tf.custom, "rollout": rollout}
    repo._write_targets(targets)
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert "release releases/identity/2.tar not taken: its signed rollout has a bad shadow " \
           "sample 0.0 must be a share in (0, 1]" in out.stdout, out.stdout
    assert active_version(data) == 1 and journal_rows(data) == []
