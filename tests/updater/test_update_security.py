"""Security: tampered artifacts and metadata, expired or replayed metadata, a release
signed by the wrong key, a hostile archive. Each is rejected with a clear error while
the current version keeps serving."""

from __future__ import annotations

import io
import shutil
import tarfile
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from tuf.api.metadata import Metadata

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from tests.support.updater_support import (
    Fleet,
    active_version,
    journal_rows,
    make_device,
    run_outpost,
    wait_done,
)
from updater.errors import ReleaseError
from updater.fleet_repo import _serializer, load_signer
from updater.release import extract_release


@pytest.fixture
def fleet(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    f.start()
    yield f
    f.stop()


@pytest.fixture
def device(short_tmp, fleet, demo_files):
    return short_tmp / "dev", make_device(short_tmp / "dev", fleet, demo_files["identity"])


def _resign(fleet, role: str, change=None, key_dir=None) -> None:
    path = fleet.dir / "metadata" / f"{role}.json"
    md = Metadata.from_file(str(path))
    if change:
        change(md.signed)
    md.signatures.clear()
    md.sign(load_signer((key_dir or fleet.dir / "keys") / f"{role}.pem"))
    path.write_bytes(md.to_bytes(_serializer()))
    if role != "timestamp":  # consistent snapshots: devices fetch N.<role>.json
        path.with_name(f"{md.signed.version}.{role}.json").write_bytes(path.read_bytes())


def _check(config, expect_rc=1):
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == expect_rc, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stdout + out.stderr


def test_tampered_artifact_is_rejected_while_the_server_keeps_serving(fleet, device):
    data, config = device
    tar = fleet.repo.target_file("releases/identity/2.tar")
    raw = bytearray(tar.read_bytes())
    raw[600] ^= 0xFF
    tar.write_bytes(bytes(raw))
    with ServerProcess(data, extra_args=["--config", str(config)]) as server:
        row = wait_done(data, 2)
        assert row["outcome"] == "failed" and "failed TUF verification" in row["detail"]
        with Client(server.socket_path) as c:
            r = c.infer("identity", {"x": np.ones((1, 16), np.float32)})
        assert r.version == 1
    assert not list((data / "staging" / "downloads").iterdir())


def test_tampered_metadata_is_rejected(fleet, device):
    data, config = device
    version = Metadata.from_file(str(fleet.dir / "metadata" / "targets.json")).signed.version
    path = fleet.dir / "metadata" / f"{version}.targets.json"
    path.write_text(path.read_text().replace('"fraction": "1.0"', '"fraction": "0.9"'))
    assert "UnsignedMetadataError" in _check(config)
    assert active_version(data) == 1 and journal_rows(data) == []


def test_expired_metadata_is_rejected(fleet, device):
    """A freeze attack: a mirror keeps serving metadata past its expiry."""
    data, config = device
    fleet.stop()
    fleet.start("--timestamp-check-s", "0")  # this server must not renew it
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)

    def expire(signed):
        signed.expires = past
        signed.version += 1
    _resign(fleet, "timestamp", expire)
    text = _check(config)
    assert "ExpiredMetadataError" in text and "keeping the current versions" in text
    assert active_version(data) == 1


def test_replayed_older_metadata_is_rejected(fleet, device, tmp_path):
    data, config = device
    fleet.repo.set_rollout("identity", 2, state="paused")
    assert "up to date" in _check(config, expect_rc=0)
    old = tmp_path / "old-metadata"
    shutil.copytree(fleet.dir / "metadata", old)
    fleet.repo.set_rollout("identity", 2, state="halted")
    assert "up to date" in _check(config, expect_rc=0)
    for f in old.iterdir():  # an attacker serves the older, validly signed files
        shutil.copy(f, fleet.dir / "metadata" / f.name)
    assert "BadVersionNumberError" in _check(config)
    assert active_version(data) == 1


def test_release_signed_by_the_wrong_key_is_rejected(fleet, device, tmp_path):
    data, config = device
    other = Fleet(tmp_path / "other")
    _resign(fleet, "targets", key_dir=other.dir / "keys")
    assert "UnsignedMetadataError" in _check(config)
    assert active_version(data) == 1


def _tar(members: list[tarfile.TarInfo], payload: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in members:
            if m.isreg():
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
            else:
                tar.addfile(m)
    return buf.getvalue()


def _member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    return m


def _release_members(extra: tarfile.TarInfo) -> list[tarfile.TarInfo]:
    return [_member("model.onnx"), _member("config.toml"), _member("samples.npz"), extra]


@pytest.mark.parametrize("hostile", [
    _member("../escape.txt"),
    _member("/tmp/outpost-escape.txt"),
    _member("sub/model.onnx"),
    _member("evil", tarfile.SYMTYPE, "/etc/passwd"),
    _member("evil2", tarfile.LNKTYPE, "model.onnx"),
    _member("fifo", tarfile.FIFOTYPE),
])
def test_archive_cannot_write_outside_its_staging_dir(tmp_path, hostile):
    archive = tmp_path / "r.tar"
    archive.write_bytes(_tar(_release_members(hostile)))
    dest = tmp_path / "stage" / "rel"
    with pytest.raises(ReleaseError, match="is not allowed in a release"):
        extract_release(archive, dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.tar", "stage"]


def test_signed_hostile_archive_is_refused_and_marked_bad(fleet, device, short_tmp):
    data, config = device
    fleet.repo.publish_archive("identity", 3, _tar(_release_members(_member("../../x"))))
    fleet.repo.set_rollout("identity", 3, new=True, fraction=1.0)
    fleet.repo.set_rollout("identity", 2, state="halted")
    text = _check(config)
    assert "identity 1 -> 3: failed" in text and "'../../x' is not allowed" in text
    assert not (data / "staging" / "x").exists() and not (short_tmp / "x").exists()
    assert active_version(data) == 1
    assert "up to date" in _check(config, expect_rc=0)  # bad locally: not tried again


def test_a_device_with_the_wrong_report_key_keeps_its_reports_until_it_has_the_right_one(
        fleet, device):
    """The fleet refuses the reports (they could be anyone's); the device keeps them queued
    and still updates; with its own key they go through."""
    import json
    import sqlite3
    import urllib.request

    data, config = device
    key_file = data / "report.key"
    right = key_file.read_text()
    key_file.write_text("00" * 32 + "\n")  # a well-formed key, not this device's
    out = _check(config, expect_rc=0)
    assert "identity 1 -> 2: committed" in out and "is not 'dev-1''s" in out
    assert active_version(data) == 2

    def queued() -> int:
        with sqlite3.connect(data / "state.db") as db:
            return db.execute("select count(*) from update_reports").fetchone()[0]

    def fleet_devices() -> dict:
        with urllib.request.urlopen(f"{fleet.url}/v1/status", timeout=10) as resp:
            return json.loads(resp.read())[0]["devices"]

    assert queued() >= 2 and fleet_devices() == {}
    key_file.write_text(right)
    _check(config, expect_rc=0)
    assert queued() == 0 and fleet_devices() == {"committed": 1}

    key_file.write_text("not a key\n")
    out = _check(config)
    assert "report_key_file" in out and "hex digits" in out and out.count("\n") <= 2


def _publish_and_roll(fleet, version, model):
    fleet.publish("identity", version, model)
    fleet.repo.set_rollout("identity", version, new=True, fraction=1.0)


def test_rotated_online_keys_are_followed_and_the_old_key_is_refused(fleet, device,
                                                                     tmp_path, demo_files):
    """Rotating the timestamp and targets keys: root 2 and 3 name the new keys, the device
    follows them to the next release, and metadata the old key signs is refused."""
    data, config = device
    assert "identity 1 -> 2: committed" in _check(config, expect_rc=0)
    old_keys = tmp_path / "old-keys"
    shutil.copytree(fleet.dir / "keys", old_keys)
    for role in ("timestamp", "targets"):
        out = run_outpost("fleet", "rotate-key", str(fleet.dir), role)
        assert out.returncode == 0, out.stderr
    root = Metadata.from_file(str(fleet.dir / "metadata" / "root.json")).signed
    assert root.version == 3 and (fleet.dir / "metadata" / "3.root.json").exists()
    assert (fleet.dir / "keys" / "timestamp.pem").read_bytes() != \
        (old_keys / "timestamp.pem").read_bytes()

    _publish_and_roll(fleet, 3, demo_files["identity"])
    assert "identity 2 -> 3: committed" in _check(config, expect_rc=0)
    assert active_version(data) == 3
    assert len(list((data / "tuf" / "root_history").glob("*.root.json"))) >= 3

    def bump(signed):
        signed.version += 1
    _resign(fleet, "timestamp", bump, key_dir=old_keys)  # a stolen, retired key
    assert "UnsignedMetadataError" in _check(config)
    assert active_version(data) == 3


def test_root_rotation_is_followed_and_a_killed_rotation_finishes_when_run_again(
        fleet, device, tmp_path, demo_files, monkeypatch):
    import os

    from updater import fleet_repo

    data, config = device
    offline = tmp_path / "offline-root.pem"
    shutil.move(fleet.dir / "keys" / "root.pem", offline)
    out = run_outpost("fleet", "rotate-key", str(fleet.dir), "root")
    assert out.returncode == 1 and "root.pem: no such key file" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_outpost("fleet", "rotate-key", str(fleet.dir), "root", "--root-key",
                      str(fleet.dir / "keys" / "targets.pem"))
    assert out.returncode == 1 and "not this fleet's root key" in out.stderr
    before = offline.read_bytes()
    out = run_outpost("fleet", "rotate-key", str(fleet.dir), "root", "--root-key", str(offline))
    assert out.returncode == 0, out.stderr
    assert offline.read_bytes() != before
    root_md = Metadata.from_file(str(fleet.dir / "metadata" / "2.root.json"))
    assert len(root_md.signatures) == 2  # the old root key and the new one

    # Killed between root 3 and moving the new snapshot key into place.
    real_replace = os.replace

    def killed(src, dst):
        if str(src).endswith("snapshot.pem.new"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)
    monkeypatch.setattr(fleet_repo.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        fleet.repo.rotate_key("snapshot", root_key=offline)
    monkeypatch.setattr(fleet_repo.os, "replace", real_replace)
    assert (fleet.dir / "keys" / "snapshot.pem.new").exists()
    out = run_outpost("fleet", "rotate-key", str(fleet.dir), "snapshot", "--root-key",
                      str(offline))
    assert out.returncode == 0, out.stderr
    assert not (fleet.dir / "keys" / "snapshot.pem.new").exists()
    assert Metadata.from_file(str(fleet.dir / "metadata" / "root.json")).signed.version == 3

    _publish_and_roll(fleet, 3, demo_files["identity"])
    assert "identity 1 -> 3: committed" in _check(config, expect_rc=0)
