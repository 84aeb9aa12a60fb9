"""The fleet dashboard: GET /v1/dashboard from a real `outpost fleet serve` that took
signed reports, against /v1/status; and its per-minute and not-seen queries on a real
fleet.db."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request

import pytest

from tests.support.updater_support import Fleet
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
