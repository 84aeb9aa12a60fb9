"""`outpost fleet serve` as a real process on 127.0.0.1: static files with Range, the
keys never served, report checks, and the auto-halt that re-signs the metadata."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from updater_support import Fleet

from updater.cohort import in_cohort


@pytest.fixture
def fleet(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    f.start()
    yield f
    f.stop()


def _get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


def _post(fleet, body) -> tuple[int, dict]:
    req = urllib.request.Request(f"{fleet.url}/v1/reports", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _report(device, rollout_id, state, version=2):
    return {"device_id": device, "model": "identity", "version": version,
            "rollout_id": rollout_id, "state": state, "detail": "", "ts": time.time(),
            "labels": {}}


def test_serves_targets_with_range_and_never_the_keys(fleet):
    target = fleet.repo.target_file("releases/identity/2.tar")
    whole = target.read_bytes()
    url = f"{fleet.url}/targets/{target.relative_to(fleet.dir / 'targets')}"
    status, body = _get(url, {"Range": "bytes=100-"})
    assert status == 206 and body == whole[100:]
    assert _get(f"{fleet.url}/metadata/timestamp.json")[0] == 200
    for url in ("/keys/targets.pem", "/metadata/../keys/root.pem", "/fleet.db",
                "/targets/../keys/timestamp.pem"):
        with pytest.raises(urllib.error.HTTPError) as info:
            _get(fleet.url + url)
        assert info.value.code in (403, 404)


@pytest.mark.parametrize(("body", "message"), [
    ({"reports": "x"}, "'reports' must be a list"),
    ({"reports": [{"device_id": "d"}]}, "reports[0].model must be a string"),
    ({"reports": [{**_report("d", "r", "committed"), "state": "exploded"}]},
     "reports[0].state 'exploded'"),
    ({"reports": [{**_report("d", "r", "committed"), "version": "2"}]},
     "version must be an integer"),
])
def test_bad_reports_get_one_clear_error(fleet, body, message):
    status, answer = _post(fleet, body)
    assert status == 400 and message in answer["error"]


def test_auto_halt_counts_only_cohort_devices_and_resigns(fleet):
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.5,
                               failure_threshold=0.2, min_reports=5)
    inside = [d for d in (f"d{i}" for i in range(200)) if in_cohort(r.id, 0.5, {}, d, {})]
    outside = [d for d in (f"d{i}" for i in range(200)) if not in_cohort(r.id, 0.5, {}, d, {})]
    version_before = fleet.repo._load("targets").signed.version
    # Failures from devices outside the cohort don't count.
    assert _post(fleet, {"reports": [_report(d, r.id, "failed") for d in outside[:10]]})[0] == 200
    assert fleet.repo.release("identity", 2).rollout.state == "active"
    # Four successes and one failure: 20%, not past the threshold.
    reports = [_report(d, r.id, "committed") for d in inside[:4]]
    reports.append(_report(inside[4], r.id, "failed"))
    _post(fleet, {"reports": reports})
    assert fleet.repo.release("identity", 2).rollout.state == "active"
    _post(fleet, {"reports": [_report(inside[5], r.id, "rolled_back")]})
    assert fleet.repo.release("identity", 2).rollout.state == "halted"
    assert fleet.repo._load("targets").signed.version == version_before + 1
    _, status = _get(f"{fleet.url}/v1/status")
    [row] = json.loads(status)
    assert row["rollout"]["state"] == "halted"
    assert row["devices"] == {"committed": 4, "failed": 11, "rolled_back": 1}


def test_server_renews_a_timestamp_near_its_expiry(tmp_path, demo_files):
    from datetime import UTC, datetime, timedelta

    from tuf.api.metadata import Metadata

    from updater.fleet_repo import _serializer, load_signer

    f = Fleet(tmp_path / "fleet")
    path = f.dir / "metadata" / "timestamp.json"
    md = Metadata.from_file(str(path))
    md.signed.expires = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    md.signatures.clear()
    md.sign(load_signer(f.dir / "keys" / "timestamp.pem"))
    path.write_bytes(md.to_bytes(_serializer()))
    old_version = md.signed.version
    f.start("--timestamp-check-s", "0.2")
    try:
        deadline = time.monotonic() + 20
        while Metadata.from_file(str(path)).signed.version == old_version:
            assert time.monotonic() < deadline, "the timestamp was not renewed"
            time.sleep(0.1)
        renewed = Metadata.from_file(str(path)).signed
        assert renewed.expires > datetime.now(UTC) + timedelta(hours=23)
    finally:
        f.stop()
