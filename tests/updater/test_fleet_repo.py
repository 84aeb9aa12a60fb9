"""The fleet's TUF repository: init, publish, rollout changes, and the CLI's errors."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from tuf.api.metadata import Metadata

from tests.support.updater_support import Fleet, run_outpost
from updater.errors import FleetRepoError
from updater.validation import read_samples


@pytest.fixture
def fleet(tmp_path):
    return Fleet(tmp_path / "fleet")


def _targets(fleet) -> Metadata:
    return Metadata.from_file(str(fleet.dir / "metadata" / "targets.json"))


def test_init_signs_every_role_with_its_own_key(fleet):
    root = Metadata.from_file(str(fleet.dir / "metadata" / "root.json"))
    keyids = {role: root.signed.roles[role].keyids[0] for role in
              ("root", "targets", "snapshot", "timestamp")}
    assert len(set(keyids.values())) == 4
    for role in ("targets", "snapshot", "timestamp"):
        md = Metadata.from_file(str(fleet.dir / "metadata" / f"{role}.json"))
        root.verify_delegate(role, md)
    with pytest.raises(FleetRepoError, match="already holds a fleet repository"):
        Fleet(fleet.dir)
    keys = sorted((fleet.dir / "keys").glob("*.pem"))
    assert keys and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)  # private keys


def test_publish_builds_expected_outputs_from_the_model(fleet, demo_files, tmp_path):
    rel = fleet.publish("identity", 2, demo_files["identity"])
    assert rel.rollout is None
    tf = _targets(fleet).signed.targets[rel.target_path]
    target = fleet.repo.target_file(rel.target_path)
    assert target.name == f"{tf.hashes['sha256']}.2.tar"  # consistent-snapshot name
    data = target.read_bytes()
    tf.verify_length_and_hashes(data)
    with tarfile.open(target) as tar:
        assert sorted(tar.getnames()) == ["config.toml", "model.onnx", "samples.npz"]
        tar.extract("samples.npz", tmp_path, filter="data")
    inputs, outputs = read_samples(tmp_path / "samples.npz")
    np.testing.assert_allclose(outputs["y"], inputs["x"])  # identity: y = x
    with pytest.raises(FleetRepoError, match="immutable"):
        fleet.publish("identity", 2, demo_files["identity"])


def test_rollout_promote_pause_halt_resign_metadata(fleet, demo_files):
    fleet.publish("identity", 2, demo_files["identity"])
    v0 = _targets(fleet).signed.version
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.05, selector={"site": "a"})
    assert (r.fraction, r.state, r.selector) == (0.05, "active", {"site": "a"})
    r2 = fleet.repo.set_rollout("identity", 2, fraction=0.5)
    assert r2.id == r.id and r2.fraction == 0.5  # a promote keeps the cohort's id
    with pytest.raises(FleetRepoError, match="only grows"):
        fleet.repo.set_rollout("identity", 2, fraction=0.1)
    assert fleet.repo.set_rollout("identity", 2, state="halted").state == "halted"
    assert fleet.repo.release("identity", 2).rollout.state == "halted"
    assert _targets(fleet).signed.version == v0 + 3
    ts = json.loads((fleet.dir / "metadata" / "timestamp.json").read_text())
    assert ts["signed"]["version"] >= 4
    fresh = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.05)
    assert fresh.id != r.id  # a new rollout draws a new cohort


def test_cli_rollout_and_status(fleet, demo_files):
    fleet.publish("identity", 2, demo_files["identity"])
    out = run_outpost("fleet", "rollout", fleet.dir, "identity", "2", "--fraction", "0.25",
                      "--selector", "site=a")
    assert out.returncode == 0, out.stderr
    out = run_outpost("fleet", "status", fleet.dir, "--json")
    [row] = json.loads(out.stdout)
    assert row["rollout"]["fraction"] == 0.25 and row["rollout"]["selector"] == {"site": "a"}


@pytest.mark.parametrize(("args", "message"), [
    (["promote", "{dir}", "identity", "9", "--fraction", "0.5"], "no release identity 9"),
    (["halt", "{dir}", "nope", "1"], "no release nope 1"),
    (["status", "{missing}"], "not a fleet repository"),
    (["rollout", "{dir}", "identity", "2", "--fraction", "1.5"], "not in 0..1"),
])
def test_cli_errors_are_one_clear_line(fleet, demo_files, args, message):
    fleet.publish("identity", 2, demo_files["identity"])
    args = [a.format(dir=fleet.dir, missing=fleet.dir / "nope") for a in args]
    out = run_outpost("fleet", *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
