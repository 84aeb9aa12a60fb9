"""`outpost fleet devices`: each device's last report, version, labels and when it was
seen, from the reports a real fleet server took."""

from __future__ import annotations

import json
import time
import urllib.request

from tests.support.updater_support import Fleet, run_outpost
from updater import report_auth
from updater.report_auth import device_key


def _post(fleet, device, reports) -> dict:
    data = json.dumps({"reports": reports}).encode()
    headers = {"Content-Type": "application/json",
               **report_auth.sign(device_key(fleet.repo.report_secret(), device), device,
                                  data)}
    req = urllib.request.Request(f"{fleet.url}/v1/reports", data=data, method="POST",
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_devices_lists_each_devices_newest_report_and_when_it_was_seen(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    r = f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    out = run_outpost("fleet", "devices", f.dir)
    assert out.returncode == 0 and "no device has reported" in out.stdout
    f.start()
    try:
        now = time.time()
        base = {"model": "identity", "version": 2, "rollout_id": r.id, "detail": ""}
        assert _post(f, "cam-1", [
            {**base, "device_id": "cam-1", "state": "committed", "ts": now,
             "labels": {"site": "berlin"}},
            # queued out of order on the device: older, so not its last report
            {**base, "device_id": "cam-1", "state": "downloading", "ts": now - 5,
             "labels": {"site": "berlin"}}])["accepted"] == 2
        assert _post(f, "cam-2", [{**base, "device_id": "cam-2", "state": "rolled_back",
                                   "detail": "error rate 40%", "ts": now,
                                   "labels": {"site": "paris", "hw": "orin"}}]) \
            == {"accepted": 1, "ignored": []}
    finally:
        f.stop()
    out = run_outpost("fleet", "devices", f.dir, "--json")
    assert out.returncode == 0, out.stderr
    rows = {d["device_id"]: d for d in json.loads(out.stdout)}
    assert set(rows) == {"cam-1", "cam-2"}
    assert (rows["cam-1"]["state"], rows["cam-1"]["version"]) == ("committed", 2)
    assert rows["cam-1"]["device_ts"] == now and rows["cam-1"]["labels"] == {"site": "berlin"}
    assert rows["cam-2"]["labels"] == {"hw": "orin", "site": "paris"}
    assert now - 5 <= rows["cam-2"]["last_seen"] <= time.time()
    text = run_outpost("fleet", "devices", f.dir).stdout.splitlines()
    assert text[0].startswith(f"cam-1: identity 2 committed (rollout {r.id}), seen ")
    assert text[1].endswith("labels hw=orin,site=paris; error rate 40%")
    out = run_outpost("fleet", "devices", tmp_path / "nope")
    assert out.returncode == 1 and "not a fleet repository" in out.stderr
    assert "Traceback" not in out.stderr
