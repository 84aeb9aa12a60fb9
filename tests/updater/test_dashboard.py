"""The fleet dashboard of a real `outpost fleet serve` that took signed reports:
GET /v1/dashboard against /v1/status; the page's own files, no secret in them, odd URLs;
the page rendered by headless Chromium against `outpost fleet status --json` and
`outpost fleet devices --json` (skipped without Debian's chromium); and the per-minute
and not-seen queries on a real fleet.db."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.updater_support import Fleet, run_outpost
from updater import report_auth
from updater.cohort import cohort_point
from updater.dashboard import (
    STALE_AFTER_S,
    _first_report_since,
    reports_per_minute,
    stale_devices,
)
from updater.fleet_db import FleetDB
from updater.plans import Plan
from updater.report_auth import device_key
from updater.shadow import ShadowPolicy


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post(fleet: Fleet, device: str, reports: list[dict]) -> dict:
    """POST reports signed by ``device`` with its own key, as its agent does."""
    data = json.dumps({"reports": reports}).encode()
    headers = {"Content-Type": "application/json",
               **report_auth.sign(device_key(fleet.repo.report_secret(), device), device,
                                  data)}
    req = urllib.request.Request(f"{fleet.url}/v1/reports", data=data, method="POST",
                                 headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _report(device: str, version: int, rollout_id: str, state: str) -> dict:
    return {"device_id": device, "model": "identity", "version": version,
            "rollout_id": rollout_id, "state": state, "detail": "", "ts": time.time(),
            "labels": {"site": "berlin"}}


class Scene:
    """A fleet with two rollouts and the reports its devices posted:

    identity 2, by hand to the whole fleet: old-0 and old-1 committed;
    identity 3, planned 50%,100% (soak 1 h, so it stays at stage 1): six cohort devices
    committed, one failed, one downloading; two devices outside the cohort failed
    (stored, not counted by the halt)."""

    SILENT = "old-1"  # made to look unheard for 20 minutes

    def __init__(self, fleet: Fleet, demo_model):
        self.fleet = fleet
        repo = fleet.repo
        fleet.publish("identity", 2, demo_model)
        fleet.publish("identity", 3, demo_model)
        self.hand = repo.set_rollout("identity", 2, new=True, fraction=1.0)
        self.planned = repo.set_rollout("identity", 3, new=True, fraction=0.5,
                                        plan=Plan((0.5, 1.0), 3600.0),
                                        failure_threshold=0.3, min_reports=5)
        ids = [f"cam-{i:02d}" for i in range(60)]
        inside = [d for d in ids if cohort_point(self.planned.id, d) < 0.5]
        outside = [d for d in ids if cohort_point(self.planned.id, d) >= 0.5]
        self.posts = [(d, _report(d, 2, self.hand.id, "committed")) for d in ("old-0", "old-1")]
        self.posts += [(d, _report(d, 3, self.planned.id, "committed")) for d in inside[:6]]
        self.posts += [(inside[6], _report(inside[6], 3, self.planned.id, "failed")),
                       (inside[7], _report(inside[7], 3, self.planned.id, "downloading"))]
        self.posts += [(d, _report(d, 3, self.planned.id, "failed")) for d in outside[:2]]

    def post_all(self) -> None:
        for device, report in self.posts:
            assert _post(self.fleet, device, [report]) == {"accepted": 1, "ignored": []}

    def silence(self) -> float:
        """Backdate SILENT's last_seen in fleet.db; the time it now says."""
        then = time.time() - 20 * 60
        with sqlite3.connect(self.fleet.dir / "fleet.db") as db:
            db.execute("update devices set last_seen = ? where device_id = ?",
                       [then, self.SILENT])
        return then


@pytest.fixture
def scene(tmp_path, demo_files):
    fleet = Fleet(tmp_path / "fleet")
    s = Scene(fleet, demo_files["identity"])
    fleet.start()
    s.post_all()
    s.silence()
    yield s
    fleet.stop()


def test_dashboard_json_carries_the_status_figures_versions_chart_and_silent_devices(scene):
    fleet = scene.fleet
    status = {row["version"]: row for row in _get_json(f"{fleet.url}/v1/status")}
    dash = _get_json(f"{fleet.url}/v1/dashboard")
    assert abs(dash["generated_at"] - time.time()) < 30
    rollouts = {r["version"]: r for r in dash["rollouts"]}
    assert set(rollouts) == {2, 3} and dash["unrolled"] == []

    planned, plan = rollouts[3], status[3]["plan"]
    assert (planned["rollout_id"], planned["state"], planned["planned"]) == \
        (scene.planned.id, "active", True)
    assert (planned["fraction"], planned["stage"]) == (plan["fraction"], plan["stage"]) \
        == (0.5, 1)
    assert planned["stages"] == [{"number": 1, "fraction": 0.5, "status": "current"},
                                 {"number": 2, "fraction": 1.0, "status": "next"}]
    assert planned["figures"] == plan["figures"]
    fig = planned["figures"]
    assert (fig["committed"], fig["failed"], fig["final"]) == (6, 1, 7)  # outsiders: not
    assert planned["failure_share"] == pytest.approx(1 / 7)
    assert (planned["failure_threshold"], planned["min_reports"]) == (0.3, 5)
    assert planned["waits_for"] == plan["waits_for"] and "waits for commits" in \
        planned["waits_for"]
    assert planned["devices"] == status[3]["devices"] == \
        {"committed": 6, "failed": 3, "downloading": 1}

    hand = rollouts[2]
    assert (hand["planned"], hand["stage"], hand["fraction"]) == (False, 1, 1.0)
    assert hand["stages"] == [{"number": 1, "fraction": 1.0, "status": "current"}]
    assert (hand["figures"]["committed"], hand["failure_share"]) == (2, 0.0)

    versions = {(v["model"], v["version"]): v for v in dash["versions"]}
    assert versions[("identity", 3)]["states"] == {"committed": 6, "failed": 3,
                                                   "downloading": 1}
    assert versions[("identity", 2)] == {"model": "identity", "version": 2, "devices": 2,
                                         "states": {"committed": 2}}

    chart = dash["reports_per_minute"]
    assert (chart["minutes"], chart["minute_s"], chart["total"]) == (60, 60, len(scene.posts))
    assert chart["start"] % 60 == 0 and chart["start"] + 3600 > time.time()
    assert sum(chart["by_state"]["committed"]) == 8
    assert sum(chart["by_state"]["failed"]) == 3
    assert all(len(counts) == 60 for counts in chart["by_state"].values())

    stale = dash["stale"]
    assert (stale["after_s"], stale["count"], stale["devices"]) == \
        (STALE_AFTER_S, 1, len(scene.posts))
    [silent] = stale["listed"]
    assert (silent["device_id"], silent["version"], silent["labels"]) == \
        (scene.SILENT, 2, {"site": "berlin"})
    assert time.time() - silent["last_seen"] >= 20 * 60 - 5


def _stored(db: FleetDB, received: list[float], state: str = "committed") -> None:
    """Reports received at the given server times (ids rise with them, as appended)."""
    db.add([{"device_id": f"d{i}", "model": "m", "version": 1, "rollout_id": "r",
             "state": state, "detail": "", "labels": {}, "ts": t, "shadow": None}
            for i, t in enumerate(received)])
    with db.db.conn as conn:
        first = conn.execute("select max(id) from reports").fetchone()[0] - len(received) + 1
        conn.executemany("update reports set received_at = ? where id = ?",
                         [(t, first + i) for i, t in enumerate(received)])


def test_reports_fall_in_their_server_minute_and_older_than_the_hour_are_left_out(tmp_path):
    now = 1_800_000_030.0  # 30 s into a minute
    with FleetDB(tmp_path / "fleet.db") as db:
        _stored(db, [now - 7200, now - 3600 - 31, now - 3600 + 31, now - 300, now - 300,
                     now - 1, now])
        _stored(db, [now], state="failed")
        chart = reports_per_minute(db, now)
    assert chart["start"] == 1_800_000_060.0 - 3600
    assert chart["by_state"]["committed"][0] == 1  # 59 min 29 s ago: the oldest minute
    assert chart["by_state"]["committed"][54] == 2  # 5 minutes ago
    assert chart["by_state"]["committed"][59] == 2 and chart["by_state"]["failed"][59] == 1
    assert chart["total"] == 6  # 2 h and 1 h 31 s ago: outside the hour


def test_the_first_report_of_the_hour_is_found_by_id_as_a_scan_would(tmp_path):
    times = [1000.0 + 7 * i for i in range(200)]
    with FleetDB(tmp_path / "fleet.db") as db:
        assert _first_report_since(db, 0.0) == 0  # no reports: nothing to skip
        _stored(db, times)
        ids = [row[0] for row in db.db.conn.execute("select id from reports order by id")]
        for since in (0.0, 1000.0, 1000.5, 1500.0, 2393.0, 2394.0, 9999.0):
            scan = next((i for i, t in zip(ids, times, strict=True) if t >= since),
                        ids[-1] + 1)
            assert _first_report_since(db, since) == scan, since


def test_devices_unheard_past_the_limit_are_counted_and_the_longest_silent_listed(tmp_path):
    now = time.time()
    with FleetDB(tmp_path / "fleet.db") as db:
        _stored(db, [now] * 5)
        with db.db.conn as conn:
            conn.executemany("update devices set last_seen = ? where device_id = ?",
                             [(now - 3600, "d3"), (now - 901, "d1"), (now - 899, "d0")])
        out = stale_devices(db, now, after_s=900, limit=1)
    assert (out["devices"], out["count"], out["after_s"]) == (5, 2, 900)
    assert [d["device_id"] for d in out["listed"]] == ["d3"]  # the longest silent first


# -- the page ----------------------------------------------------------------------------

PAGE_URLS = ("/", "/dashboard/dashboard.js", "/dashboard/dashboard.css", "/v1/dashboard")


def _ask(fleet: Fleet, method: str, path: str) -> tuple[int, dict, bytes]:
    """One request with the path exactly as given (no client normalising it)."""
    conn = http.client.HTTPConnection("127.0.0.1", fleet.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _secrets(fleet: Fleet, devices) -> list[bytes]:
    """What must never leave keys/: the report secret, each device's report key, and the
    body of every private key the fleet signs with."""
    secret = fleet.repo.report_secret()
    out = [secret.hex().encode(), secret, b"PRIVATE KEY"]
    out += [device_key(secret, d).hex().encode() for d in devices]
    for pem in sorted((fleet.dir / "keys").glob("*.pem")):
        out += [line for line in pem.read_bytes().splitlines()
                if line and not line.startswith(b"-----")]
    return out


def test_the_page_ships_its_own_files_and_carries_no_secret(scene):
    fleet = scene.fleet
    devices = [d for d, _ in scene.posts]
    secrets = _secrets(fleet, devices)
    assert len(secrets) >= 3 + len(devices) + 4  # root, targets, snapshot, timestamp keys
    bodies = {}
    for path in PAGE_URLS:
        status, headers, body = _ask(fleet, "GET", path)
        assert status == 200, (path, body[:300])
        bodies[path] = body
        leaked = [s[:12] for s in secrets if s in body]
        assert not leaked, (path, leaked)
    assert _ask(fleet, "GET", "/")[1]["Content-Type"].startswith("text/html")
    csp = _ask(fleet, "GET", "/")[1]["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # Nothing from another origin: every src and href is the page's own or a data: URL.
    refs = re.findall(rb'(?:src|href)="([^"]*)"', bodies["/"])
    assert refs and all(r.startswith((b"/dashboard/", b"data:")) for r in refs), refs
    assert not re.search(rb"https?://(?!www\.w3\.org/2000/svg)",
                         b"".join(bodies[p] for p in PAGE_URLS[:3]))
    assert b'fetch("/v1/dashboard"' in bodies["/dashboard/dashboard.js"]


ODD_DASHBOARD_URLS = [  # (method, path, status)
    ("POST", "/", 405), ("PUT", "/", 405), ("DELETE", "/", 405),
    ("POST", "/v1/dashboard", 405), ("POST", "/dashboard/dashboard.js", 405),
    ("GET", "/dashboard/../keys/report.key", 404),
    ("GET", "/dashboard/%2e%2e/keys/report.key", 404),
    ("GET", "/dashboard/%2e%2e%2fkeys%2freport.key", 404),
    ("GET", "/dashboard/..%2F..%2Fkeys%2Ftargets.pem", 404),
    ("GET", "/dashboard/..", 404), ("GET", "/dashboard/.", 404),
    ("GET", "/dashboard/", 404), ("GET", "/dashboard", 404),
    ("GET", "/dashboard/index.html", 404), ("GET", "/dashboard/dashboard.py", 404),
    ("GET", "/dashboard/dashboard.js/x", 404), ("GET", "/dashboard/%00", 404),
    ("GET", "/dashboard/fleet.db", 404), ("GET", "/dashboard/dashboard.js?v=1", 400),
    ("GET", "/?x", 400), ("GET", "/v1/dashboard?since=0", 400),
]


def test_odd_urls_of_the_dashboard_get_a_4xx_that_says_why(scene):
    fleet = scene.fleet
    secrets = _secrets(fleet, [])
    for method, path, want in ODD_DASHBOARD_URLS:
        status, headers, body = _ask(fleet, method, path)
        assert status == want, (method, path, status, body[:300])
        assert json.loads(body)["error"], (method, path)
        assert not [s for s in secrets if s in body], (method, path)
        if status == 405:
            assert "GET" in headers["Allow"], (method, path)
    fleet.stop()
    log = (fleet.dir / "server.log").read_text()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


# -- the page in a real browser ------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Elements(HTMLParser):
    """Each element: its attributes, its whole text and the elements that hold it."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self.all: list[dict] = []  # every element, for data-attribute look-ups
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": "", "within": list(self._open)}
        self.all.append(node)
        if "id" in node["attrs"]:
            self.by_id[node["attrs"]["id"]] = node
        if tag not in ("meta", "link", "br", "img", "input", "hr"):  # HTML's void ones
            self._open.append(node)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for node in self._open:
            node["text"] += data

    def find(self, tag: str | None = None, inside: dict | None = None, **attrs) -> list[dict]:
        """Elements with these attributes (data_state: data-state), inside an element."""
        want = {k.replace("_", "-"): str(v) for k, v in attrs.items()}
        return [n for n in self.all if all(n["attrs"].get(k) == v for k, v in want.items())
                and tag in (None, n["tag"])
                and (inside is None or any(o is inside for o in n["within"]))]


def _chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget: run the page's script, its fetch included, before dumping;
    # the next 5 s refresh lies past the budget. Root needs --no-sandbox.
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", f"--user-data-dir={profile}",
         "--virtual-time-budget=4000", *args, url],
        capture_output=True, text=True, timeout=60, check=False)


def _pct(share: float) -> str:
    return f"{round(share * 100, 1):g}%"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for a headless "
                    "browser: apt-get install -y chromium")
def test_the_page_in_chromium_shows_what_fleet_status_says(scene, tmp_path):
    fleet = scene.fleet
    out = _chromium(f"{fleet.url}/", tmp_path / "profile", "--dump-dom")
    assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-2000:]
    dom = _Elements()
    dom.feed(out.stdout)
    assert dom.by_id["updated"]["attrs"]["data-state"] == "ok", out.stdout[:2000]

    status = run_outpost("fleet", "status", fleet.dir, "--json")
    assert status.returncode == 0, status.stderr
    rows = [r for r in json.loads(status.stdout) if r["rollout"]]
    assert {r["rollout"]["id"] for r in rows} == {scene.hand.id, scene.planned.id}
    for row in rows:
        ro, plan = row["rollout"], row["plan"]
        rid = f"rollout-{ro['id']}"

        def shown(field, rid=rid):
            node = dom.by_id[f"{rid}-{field}"]
            return node["attrs"]["data-value"], node["text"]

        assert dom.by_id[rid]["attrs"]["data-state"] == ro["state"]
        assert shown("fraction") == (f"{ro['fraction']:g}", _pct(ro["fraction"]))
        stage, stages = (plan["stage"], plan["stages"]) if plan else (1, 1)
        assert shown("stage") == (str(stage), str(stage))
        assert shown("stages") == (str(stages), str(stages))
        card = dom.by_id[rid]
        assert [b["attrs"]["data-stage"] for b in dom.find(inside=card, data_status="current")] \
            == [str(stage)]
        if plan:  # a planned rollout's status carries the cohort figures the halt judges
            fig = plan["figures"]
        else:  # by hand, to the whole fleet: every reporting device is in the cohort
            final = sum(n for s, n in row["devices"].items()
                        if s in ("committed", "failed", "rolled_back", "rejected_in_shadow"))
            fig = {"committed": row["devices"].get("committed", 0), "final": final,
                   "failed": final - row["devices"].get("committed", 0)}
        for field in ("committed", "failed", "final"):
            assert shown(field) == (str(fig[field]), str(fig[field])), (rid, field)
        share = fig["failed"] / fig["final"]
        value, text = shown("failure-share")
        assert float(value) == pytest.approx(share) and text == f"{share:.1%}"
        assert shown("failure-threshold") == (f"{ro['failure_threshold']:g}",
                                              _pct(ro["failure_threshold"]))
        for state, n in row["devices"].items():
            [li] = dom.find("li", card, data_state=state, data_count=n)
            assert li["text"].strip() == f"{state} {n}"
    planned = dom.by_id[f"rollout-{scene.planned.id}"]
    assert (planned["attrs"]["data-model"], planned["attrs"]["data-version"]) == \
        ("identity", "3")
    assert "waits for commits: 6 of" in dom.by_id[f"rollout-{scene.planned.id}-waits-for"][
        "text"]

    # The chart: every report posted, by state; the versions table; the silent device.
    legend = {n["attrs"]["data-state"]: int(n["attrs"]["data-total"])
              for n in dom.find("li", dom.by_id["chart-legend"])}
    assert legend == {"committed": 8, "failed": 3, "downloading": 1, "all": 12}
    rects = dom.find("rect", dom.by_id["chart"])
    assert sum(int(r["attrs"]["data-count"]) for r in rects) == len(scene.posts)
    devices = run_outpost("fleet", "devices", fleet.dir, "--json")
    assert devices.returncode == 0, devices.stderr
    per_version = Counter((d["model"], d["version"], d["state"])
                          for d in json.loads(devices.stdout))
    shown_per_version = Counter()
    for tr in dom.find("tr", dom.by_id["version-table"]):
        if "data-model" in tr["attrs"]:
            key = (tr["attrs"]["data-model"], int(tr["attrs"]["data-version"]))
            for td in dom.find("td", tr):
                if td["attrs"].get("data-state") and td["attrs"]["data-value"] != "0":
                    shown_per_version[(*key, td["attrs"]["data-state"])] += \
                        int(td["attrs"]["data-value"])
    assert shown_per_version == per_version
    assert dom.by_id["stale-count"]["attrs"]["data-value"] == "1"
    assert dom.by_id["stale-minutes"]["text"] == f"{STALE_AFTER_S / 60:g}"
    [silent] = dom.find(data_device_id=scene.SILENT)
    assert "20 min ago" in silent["text"] and "site=berlin" in silent["text"]
    leaked = [s[:12] for s in _secrets(fleet, [d for d, _ in scene.posts])
              if s.decode("latin-1") in out.stdout]
    assert not leaked

    shot = tmp_path / "dashboard.png"
    out = _chromium(f"{fleet.url}/", tmp_path / "profile", f"--screenshot={shot}",
                    "--window-size=1100,1500", "--hide-scrollbars")
    assert out.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", \
        out.stderr[-2000:]
    print(f"dashboard screenshot: {shot}")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for a headless "
                                             "browser: apt-get install -y chromium")
def test_a_shadow_phase_shows_what_fleet_status_says(tmp_path, demo_files):
    """Devices that shadowed a release (one passed, one rejected in shadow): the page's
    shadow figures are fleet status's."""
    fleet = Fleet(tmp_path / "fleet")
    fleet.publish("identity", 2, demo_files["identity"])
    ro = fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0,
                                shadow=ShadowPolicy(60.0, 100, 0.05, 2.0))
    figures = {"passed": ("shadow_passed", 0.01), "rejected": ("rejected_in_shadow", 0.4)}
    fleet.start()
    try:
        for device, (state, disagreement) in figures.items():
            report = {**_report(device, 2, ro.id, state),
                      "shadow": {"elapsed_s": 60.0, "requests": 200, "agreed": 0, "errors": 0,
                                 "shed": 0, "p50_ms": 1.0, "p99_ms": 2.0, "live_p50_ms": 1.0,
                                 "live_p99_ms": 2.0, "disagreement": disagreement}}
            assert _post(fleet, device, [report])["accepted"] == 1
        out = _chromium(f"{fleet.url}/", tmp_path / "profile", "--dump-dom")
        assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-2000:]
        status = run_outpost("fleet", "status", fleet.dir, "--json")
        assert status.returncode == 0, status.stderr
    finally:
        fleet.stop()
    dom = _Elements()
    dom.feed(out.stdout)
    [row] = [r for r in json.loads(status.stdout) if r["rollout"]]
    sh = row["shadow"]
    assert (sh["devices"], sh["passed"], sh["rejected"]) == (2, 1, 1)  # the scene holds
    rid = f"rollout-{ro.id}"
    for field in ("devices", "passed", "rejected", "waiting", "requests"):
        node = dom.by_id[f"{rid}-shadow-{field}"]
        assert node["attrs"]["data-value"] == node["text"] == str(sh[field]), field
    for field, key in (("disagreement", "disagreement"), ("worst", "worst_disagreement")):
        node = dom.by_id[f"{rid}-shadow-{field}"]
        assert float(node["attrs"]["data-value"]) == pytest.approx(sh[key])
        assert node["text"] == f"{sh[key]:.1%}"


# -- how releases travelled: deltas and full files, waiting devices, engines -------------------

TRAVEL = {  # device -> its reports on the rollout, oldest first
    "cam-a": [("downloaded", {"kind": "delta", "bytes": 1_234, "full_bytes": 2_181_120,
                              "base_version": 1}, None),
              ("validated", None, "prebuilt"), ("waiting_window", None, None)],
    "cam-b": [("downloaded", {"kind": "full", "bytes": 2_181_120, "full_bytes": 2_181_120},
               None), ("validated", None, "built"), ("waiting_app", None, None)],
    "cam-c": [("downloaded", {"kind": "delta", "bytes": 98_765, "full_bytes": 2_181_120,
                              "base_version": 1}, None),
              ("validated", None, "built"), ("committed", None, None)],
}


def travel_reports(rollout_id: str) -> dict[str, list[dict]]:
    """TRAVEL as each device's reports (identity 2), a second apart."""
    t = time.time() - 60
    out = {}
    for device, steps in TRAVEL.items():
        out[device] = []
        for i, (state, download, engine) in enumerate(steps):
            r = {**_report(device, 2, rollout_id, state), "ts": t + i}
            if download:
                r["download"] = download
            if engine:
                r["engine"] = engine
            out[device].append(r)
    return out


@pytest.fixture
def travelled(tmp_path, demo_files):
    """A rollout whose devices reported how the release reached them."""
    fleet = Fleet(tmp_path / "fleet")
    fleet.publish("identity", 2, demo_files["identity"])
    ro = fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    fleet.start()
    for device, reports in travel_reports(ro.id).items():
        assert _post(fleet, device, reports) == {"accepted": len(reports), "ignored": []}
    yield fleet, ro
    fleet.stop()


def test_dashboard_json_carries_how_the_release_travelled_as_status_does(travelled):
    fleet, ro = travelled
    [status] = [r for r in _get_json(f"{fleet.url}/v1/status") if r["rollout"]]
    [shown] = _get_json(f"{fleet.url}/v1/dashboard")["rollouts"]
    for key in ("downloads", "waiting", "engines"):
        assert shown[key] == status[key], key
    assert status["downloads"]["delta"] == {"devices": 2, "bytes": 1_234 + 98_765}
    assert status["downloads"]["full"] == {"devices": 1, "bytes": 2_181_120}
    assert status["downloads"]["saved_bytes"] == 3 * 2_181_120 - (1_234 + 98_765 + 2_181_120)
    assert status["waiting"] == {"window": 1, "app": 1}
    assert status["engines"] == {"prebuilt": 1, "built": 2}


def _bytes(n: int) -> str:
    """The page's bytes(): SI units, one decimal."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium for a headless "
                                             "browser: apt-get install -y chromium")
def test_the_page_shows_how_the_release_travelled_as_fleet_status_says(travelled, tmp_path):
    fleet, ro = travelled
    out = _chromium(f"{fleet.url}/", tmp_path / "profile", "--dump-dom")
    assert out.returncode == 0 and "</html>" in out.stdout, out.stderr[-2000:]
    status = run_outpost("fleet", "status", fleet.dir, "--json")
    assert status.returncode == 0, status.stderr
    [row] = [r for r in json.loads(status.stdout) if r["rollout"]]
    dom = _Elements()
    dom.feed(out.stdout)
    d, w, e = row["downloads"], row["waiting"], row["engines"]
    rid = f"rollout-{ro.id}"
    for field, value, text in (
            ("delta-devices", d["delta"]["devices"], None),
            ("delta-bytes", d["delta"]["bytes"], _bytes),
            ("full-devices", d["full"]["devices"], None),
            ("full-bytes", d["full"]["bytes"], _bytes),
            ("sent-bytes", d["bytes"], _bytes), ("saved-bytes", d["saved_bytes"], _bytes),
            ("waiting-window", w["window"], None), ("waiting-app", w["app"], None),
            ("engines-prebuilt", e["prebuilt"], None), ("engines-built", e["built"], None)):
        node = dom.by_id[f"{rid}-{field}"]
        assert node["attrs"]["data-value"] == str(value), field
        assert node["text"] == (text or str)(value), field
    assert (d["delta"]["devices"], w["window"], w["app"], e["prebuilt"]) == (2, 1, 1, 1)
    card = dom.by_id[rid]
    for state in ("waiting_window", "waiting_app", "committed"):
        [li] = dom.find("li", card, data_state=state, data_count=1)
        assert li["text"].strip() == f"{state} 1"
