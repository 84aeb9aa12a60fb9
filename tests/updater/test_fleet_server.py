"""`outpost fleet serve` as a real process on 127.0.0.1: static files with Range, the
keys never served, report checks, and the auto-halt that re-signs the metadata."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.support.updater_support import Fleet
from updater import report_auth
from updater.cohort import in_cohort
from updater.report_auth import device_key
from updater.shadow import ShadowFigures, ShadowPolicy


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


def _post(fleet, body, *, device: str = "dev", key: bytes | None = None,
          now: float | None = None, sign: bool = True) -> tuple[int, dict]:
    """POST ``body`` signed as ``device`` (with its own key unless ``key`` is given)."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if sign:
        if key is None:
            key = device_key(fleet.repo.report_secret(), device)
        headers.update(report_auth.sign(key, device, data, now))
    req = urllib.request.Request(f"{fleet.url}/v1/reports", data=data, method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_each(fleet, reports) -> set[int]:
    """Each report in a POST of its own, signed by its device; the statuses seen."""
    return {_post(fleet, {"reports": [r]}, device=r["device_id"])[0] for r in reports}


def _report(device, rollout_id, state, version=2):
    return {"device_id": device, "model": "identity", "version": version,
            "rollout_id": rollout_id, "state": state, "detail": "", "ts": time.time(),
            "labels": {}}


def _raw(fleet, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client normalising the path); (status, body)."""
    import socket

    with socket.create_connection(("127.0.0.1", fleet.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _ask(fleet, method: str, path: str) -> tuple[int, dict, bytes]:
    """One request with the path exactly as given: (status, headers, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


_ROOT = "/metadata/1.root.json"
ODD_URLS = [  # (method, path, status, words of the message)
    ("GET", "/metadata/" + "a" * 5000, 414, "at most 1024"),
    ("GET", "/targets/" + "a/" * 600, 414, "at most 1024"),
    ("GET", "/metadata/" + "a" * 300, 414, "at most 255"),
    ("GET", "/metadata/../keys/root.pem", 400, "not starting with '.'"),
    ("GET", "/metadata/%2e%2e/keys/root.pem", 400, "not starting with '.'"),
    ("GET", "/metadata/%2e%2e%2fkeys%2froot.pem", 400, "not starting with '.'"),
    ("GET", "/targets/..%2F..%2Fkeys%2Ftimestamp.pem", 400, "not starting with '.'"),
    ("GET", "/metadata/.root.json", 400, "not starting with '.'"),
    ("GET", "/metadata/%00", 400, "letters, digits"),
    ("GET", "/metadata/a%ffb", 400, "letters, digits"),
    ("GET", "/metadata/%C3%A9t%C3%A9.json", 400, "letters, digits"),
    ("GET", "/metadata/a\\b", 400, "letters, digits"),
    ("GET", "/metadata/~root", 400, "letters, digits"),
    ("GET", "/metadata/a:b;c", 400, "letters, digits"),
    ("GET", "/metadata/%2Fetc%2Fpasswd", 404, "not a file"),
    ("GET", "/metadata//etc/passwd", 404, "not a file"),
    ("GET", _ROOT + "/", 404, "not a file"),
    ("GET", "/metadata/", 404, "not a file"),
    ("GET", "/targets/", 404, "not a file"),
    ("GET", "/targets/releases", 404, "a folder"),
    ("GET", "/metadata/no-such.json", 404, "no such file"),
    ("GET", "/metadata", 404, "no such path"),
    ("GET", "//etc/passwd", 404, "no such path"),
    ("GET", "/keys/root.pem", 404, "no such path"),
    ("GET", _ROOT + "?x=1", 400, "no query string"),
    ("GET", "/v1/status?verbose", 400, "no query string"),
    ("GET", "/targets/../keys/timestamp.pem?", 400, "not starting with '.'"),
    ("PUT", _ROOT, 405, "GET"),
    ("DELETE", _ROOT, 405, "GET"),
    ("POST", _ROOT, 405, "GET"),
    ("OPTIONS", _ROOT, 405, "GET"),
    ("TRACE", _ROOT, 405, "GET"),
    ("PROPFIND", "/targets/", 405, "GET"),
    ("GET", "/v1/reports", 405, "POST"),
    ("DELETE", "/v1/status", 405, "GET"),
]


def test_every_odd_url_gets_a_4xx_that_says_why_and_no_traceback(fleet):
    # Links out of the served folders are not followed.
    (fleet.dir / "targets" / "root.pem").symlink_to(fleet.dir / "keys" / "root.pem")
    (fleet.dir / "metadata" / "keys").symlink_to(fleet.dir / "keys")
    for method, path, status, words in [*ODD_URLS,
                                        ("GET", "/targets/root.pem", 404, "no such file"),
                                        ("GET", "/metadata/keys/root.pem", 404, "no such")]:
        got, headers, body = _ask(fleet, method, path)
        assert got == status, (method, path[:80], got, body[:300])
        message = json.loads(body)["error"]
        assert words in message, (method, path[:80], message)
        if status == 405:
            assert words in headers["Allow"]
    # Too malformed for the HTTP parser: aiohttp answers 400 itself.
    for request in (b"GET /metadata/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"FOO " + _ROOT.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /metadata/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET " + _ROOT.encode() + b" HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000
                    + b"\r\n\r\n"):
        assert 400 <= _raw(fleet, request)[0] < 500, request[:40]
    # An unknown method after a first request on the same connection (aiohttp logs that
    # one as an error, the first one at debug level).
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
    conn.request("GET", _ROOT)
    assert conn.getresponse().read() and conn.sock is not None
    conn.sock.sendall(b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.sock.recv(65536).split()[1] == b"400"
    conn.close()
    # What is served still is, HEAD and Range included.
    assert _ask(fleet, "GET", _ROOT)[0] == 200
    status, headers, body = _ask(fleet, "HEAD", _ROOT)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert _get(f"{fleet.url}{_ROOT}", {"Range": "bytes=0-9"}) == (
        206, (fleet.dir / "metadata" / "1.root.json").read_bytes()[:10])
    fleet.stop()
    log = (fleet.dir / "server.log").read_text()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


def test_sigterm_stops_the_fleet_server_cleanly(fleet):
    fleet.proc.terminate()
    assert fleet.proc.wait(10) == 0
    assert "Traceback" not in (fleet.dir / "server.log").read_text()


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
        assert info.value.code in (400, 403, 404)  # 400: a '..' segment


@pytest.mark.parametrize(("body", "message"), [
    ({"reports": "x"}, "'reports' must be a list"),
    ({"reports": [{"device_id": "d"}]}, "reports[0].model must be a string"),
    ({"reports": [{**_report("d", "r", "committed"), "state": "exploded"}]},
     "reports[0].state 'exploded'"),
    ({"reports": [{**_report("d", "r", "committed"), "version": "2"}]},
     "version must be an integer"),
    ({"reports": [{**_report("d", "r", "rejected_in_shadow"), "shadow": [1]}]},
     "reports[0].shadow must be an object of figures"),
    ({"reports": [{**_report("d", "r", "rejected_in_shadow"),
                   "shadow": {"disagreement": 2.0}}]},
     "reports[0].shadow.disagreement must be a share in 0..1"),
    ({"reports": [{**_report("d", "r", "rejected_in_shadow"), "shadow": {"mood": 1}}]},
     "reports[0].shadow has an unknown figure 'mood'"),
])
def test_bad_reports_get_one_clear_error(fleet, body, message):
    status, answer = _post(fleet, body)
    assert status == 400 and message in answer["error"]


def test_reports_are_taken_only_signed_by_the_device_they_are_about(fleet):
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0, min_reports=1,
                               failure_threshold=0.0)
    failed = {"reports": [_report("d1", r.id, "failed")]}
    status, answer = _post(fleet, failed, sign=False)
    assert status == 401 and "must be signed" in answer["error"]
    other_key = device_key(fleet.repo.report_secret(), "d2")
    status, answer = _post(fleet, failed, device="d1", key=other_key)
    assert status == 401 and "not 'd1''s" in answer["error"]
    status, answer = _post(fleet, failed, device="d2")  # d2's own key, d1's report
    assert status == 403 and "for itself only" in answer["error"]
    status, answer = _post(fleet, failed, device="d1", now=time.time() - 3600)
    assert status == 401 and "clock" in answer["error"]
    assert fleet.repo.release("identity", 2).rollout.state == "active"  # none counted
    assert json.loads(_get(f"{fleet.url}/v1/status")[1])[0]["devices"] == {}

    stamp = time.time()
    assert _post(fleet, failed, device="d1", now=stamp)[0] == 200
    status, answer = _post(fleet, failed, device="d1", now=stamp)  # the same POST again
    assert status == 401 and "replay" in answer["error"]
    assert fleet.repo.release("identity", 2).rollout.state == "halted"


def test_a_fleet_made_before_signed_reports_takes_them_unsigned_until_it_has_a_secret(
        tmp_path, demo_files):
    import os
    import subprocess
    import sys

    f = Fleet(tmp_path / "fleet")
    f.repo.report_secret_path.unlink()  # as a fleet made by an older outpost
    f.start()
    try:
        assert _post(f, {"reports": [_report("d1", "r", "committed")]}, sign=False)[0] == 200
    finally:
        f.stop()
    out = subprocess.run([sys.executable, "-m", "appliance", "fleet", "device-key",
                          str(f.dir), "d1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    secret = f.repo.report_secret()
    assert out.stdout.strip() == device_key(secret, "d1").hex()
    assert os.stat(f.repo.report_secret_path).st_mode & 0o077 == 0
    f.start()
    try:
        body = {"reports": [_report("d1", "r", "committed")]}
        assert _post(f, body, sign=False)[0] == 401
        assert _post(f, body, device="d1")[0] == 200
    finally:
        f.stop()


def test_auto_halt_counts_only_cohort_devices_and_resigns(fleet):
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.5,
                               failure_threshold=0.2, min_reports=5)
    inside = [d for d in (f"d{i}" for i in range(200)) if in_cohort(r.id, 0.5, {}, d, {})]
    outside = [d for d in (f"d{i}" for i in range(200)) if not in_cohort(r.id, 0.5, {}, d, {})]
    version_before = fleet.repo._load("targets").signed.version
    # Failures from devices outside the cohort don't count.
    assert _post_each(fleet, [_report(d, r.id, "failed") for d in outside[:10]]) == {200}
    assert fleet.repo.release("identity", 2).rollout.state == "active"
    # Four successes and one failure: 20%, not past the threshold.
    reports = [_report(d, r.id, "committed") for d in inside[:4]]
    reports.append(_report(inside[4], r.id, "failed"))
    assert _post_each(fleet, reports) == {200}
    assert fleet.repo.release("identity", 2).rollout.state == "active"
    _post_each(fleet, [_report(inside[5], r.id, "rolled_back")])
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


def _shadow_report(device, rollout_id, state, agreed, requests=200, p99_ms=3.0):
    fig = ShadowFigures(elapsed_s=60.0, requests=requests, agreed=agreed, shed=4,
                        p50_ms=1.5, p99_ms=p99_ms, live_p50_ms=1.4, live_p99_ms=2.5)
    return {**_report(device, rollout_id, state), "shadow": fig.as_report(),
            "detail": fig.describe()}


def test_shadow_rejections_count_as_failures_and_status_shows_the_figures(fleet):
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0, failure_threshold=0.3,
                               min_reports=4, shadow=ShadowPolicy(60.0, 100, 0.02, 1.5))
    devices = [f"d{i}" for i in range(6)]
    assert _post_each(fleet, [_shadow_report(d, r.id, "shadowing", 0, 0)
                              for d in devices]) == {200}
    # Three pass their shadow phase and commit; one is still waiting for traffic.
    passed = [_shadow_report(d, r.id, "shadow_passed", 199) for d in devices[:3]]
    assert _post_each(fleet, passed) == {200}
    assert _post_each(fleet, [_report(d, r.id, "committed") for d in devices[:3]]) == {200}
    assert _post_each(fleet, [_shadow_report(devices[5], r.id, "shadow_waiting", 3, 3)]) \
        == {200}
    # One rejection: 1 of 4 final, 25%, under the threshold.
    assert _post_each(fleet, [_shadow_report(devices[3], r.id, "rejected_in_shadow", 150,
                                             p99_ms=10.0)]) == {200}
    assert fleet.repo.release("identity", 2).rollout.state == "active"
    _, body = _get(f"{fleet.url}/v1/status")
    [row] = json.loads(body)
    assert row["rollout"]["shadow"]["max_disagreement"] == 0.02
    sh = row["shadow"]
    assert (sh["devices"], sh["passed"], sh["rejected"], sh["waiting"], sh["shadowing"]) \
        == (6, 3, 1, 1, 1)
    assert sh["requests"] == 3 * 200 + 200 + 3
    assert sh["worst_disagreement"] == 0.25 and sh["worst_p99_ratio"] == 4.0
    assert sh["disagreement"] == pytest.approx((3 * 1 + 50) / 803, abs=1e-6)
    # A second rejection: 2 of 5, 40%: the fleet halts the rollout by itself.
    assert _post_each(fleet, [_shadow_report(devices[4], r.id, "rejected_in_shadow", 100)]) \
        == {200}
    assert fleet.repo.release("identity", 2).rollout.state == "halted"
    from tests.support.updater_support import run_outpost

    out = run_outpost("fleet", "status", fleet.dir, "identity")
    assert out.returncode == 0, out.stderr
    assert "identity 2: halted at 100.0%" in out.stdout
    assert "rejected_in_shadow 2" in out.stdout
    assert "shadow 60s, >= 100 requests, disagreement <= 2.0%: 6 devices (passed 3, " \
           "rejected 2, shadowing 0, waiting for traffic 1, skipped 0)" in out.stdout
    assert "worst p99 4.00x the active version's" in out.stdout
    js = json.loads(run_outpost("fleet", "status", fleet.dir, "--json").stdout)
    assert js[0]["shadow"]["rejected"] == 2
    assert "rejected it in shadow" in (fleet.dir / "server.log").read_text()
