"""What the fleet sees of how a release travelled (issue 24 part 5): bytes sent as deltas
and as full files, devices waiting for an activation window or for their app, and devices
whose TensorRT engine came prebuilt or was built there.

End to end: one release (a delta from 1, a plan prebuilt for the Orin, an activation
window 02:00-04:00) served by a real fleet server to four real update agents on the
TensorRT stand-in, each with its own clock; then `outpost fleet status --json` (the
tallies rebuilt from fleet.db) and the server's /v1/status (the tallies each report
moved) say the same figures, and those are the devices' own. The reports' new fields are
checked like the rest (a bad one is a 400 that names it, nothing stored), and a report
without them is still taken. The tally's counts, moved report by report in any order,
equal a recount of each device's newest report.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
import tomllib
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime

import pytest

from appliance.config.profiles import load_profile
from appliance.models.repository import Repository
from tests.support.updater_support import Fleet, active_version, run_outpost, wait_for
from tests.updater.test_dashboard import travel_reports
from tests.updater.test_delta_update import _have_zstd, weights_model
from tests.updater.test_fleet_postgres import Replica
from tests.updater.test_prebuilt_engines import ORIN, PROFILE, XAVIER, Device, _compile
from updater import pg_cluster, report_auth
from updater.activation import ActivationPolicy
from updater.cohort import Rollout
from updater.fleet_repo import delta_path, release_path
from updater.report_auth import device_key
from updater.rollout_tally import RolloutTally, fleet_view
from updater.validation import make_release_samples
from updater.wiring import make_agent

pytestmark = pytest.mark.skipif(not _have_zstd(), reason="deltas need backports.zstd")

OUTSIDE = datetime(2025, 3, 3, 12, 0)  # the window is 02:00-04:00, local time
INSIDE = datetime(2025, 3, 3, 2, 30)


@pytest.fixture
def fleet(tmp_path, capsys):
    """identity 2: a delta from 1, the Orin's plan attached, activation 02:00-04:00."""
    f = Fleet(tmp_path / "fleet")
    v1, v2 = weights_model(tmp_path / "v1.onnx"), weights_model(tmp_path / "v2.onnx",
                                                                 head_seed=99)
    f.publish("identity", 1, v1)
    folder = tmp_path / "release"
    folder.mkdir()
    config, samples = make_release_samples(v2, None, None, folder)
    f.repo.publish("identity", 2, v2, config, samples, delta_from=(1,),
                   activation=ActivationPolicy(window="02:00-04:00"))
    plan = tmp_path / "v2.plan"
    _compile(v2, config, plan, tmp_path / "ref", capsys)
    out = run_outpost("fleet", "attach-engine", f.dir, "identity", "2", plan,
                      "--profile", PROFILE)
    assert out.returncode == 0, out.stderr
    f.rollout = f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    f.models = {"v1": v1, "other": weights_model(tmp_path / "other.onnx", seed=5)}
    f.start()
    yield f
    f.stop()


def _pass(dev: Device, now: datetime, word: dict | None = None) -> list[str]:
    """One update pass of the device's real agent at local time ``now``; with ``word``,
    the app's word (update_activation) and one more pass."""
    table = tomllib.loads(dev.config.read_text())["updater"]
    repo = Repository(dev.data)
    agent = make_agent(table, dev.data, repo, dev.engine, load_profile(PROFILE))
    agent.clock = lambda: now

    async def run() -> list[str]:
        out = await agent.check_once()
        if word is not None:
            await agent.app_word(word)
            out += await agent.check_once()
        return out

    try:
        return asyncio.run(run())
    finally:
        agent.close()
        repo.close()


def _size(fleet: Fleet, path: str) -> int:
    return fleet.repo.target_file(path).stat().st_size


def _status_rows(fleet: Fleet) -> tuple[dict, dict]:
    """identity 2's row of `fleet status --json` (offline, from fleet.db) and of the
    server's /v1/status (its live tallies)."""
    out = run_outpost("fleet", "status", fleet.dir, "--json")
    assert out.returncode == 0, out.stderr
    [cli] = [r for r in json.loads(out.stdout) if r["version"] == 2]
    with urllib.request.urlopen(f"{fleet.url}/v1/status", timeout=10) as resp:
        [live] = [r for r in json.loads(resp.read()) if r["version"] == 2]
    return cli, live


def test_status_shows_delta_and_full_bytes_waiting_devices_and_prebuilt_engines(
        fleet, short_tmp):
    m = fleet.models
    # a: holds 1, Orin -> the delta, the prebuilt plan; outside the window
    # b: holds 1, another GPU -> the delta, builds; the app defers it
    # c: holds nothing, Orin -> the full release, the prebuilt plan; inside the window
    # d: holds another 1 -> fetches the delta, can't use it, the full release; builds
    a, b, c, d = (Device(short_tmp / n, fleet, m[v1], gpu=gpu, device_id=f"cam-{n}",
                         installed=n != "c")
                  for n, v1, gpu in (("a", "v1", ORIN), ("b", "v1", XAVIER),
                                     ("c", "v1", ORIN), ("d", "other", XAVIER)))
    for dev, now in ((a, OUTSIDE), (c, INSIDE), (d, INSIDE)):
        lines = _pass(dev, now)
        assert lines, lines
    _pass(b, OUTSIDE, {"action": "defer", "for_s": 3600})
    assert [active_version(x.data) for x in (a, b, c, d)] == [1, 1, 2, 2]
    assert (len(a.trt.builds), len(b.trt.builds), len(c.trt.builds),
            len(d.trt.builds)) == (0, 1, 0, 1)

    full = _size(fleet, release_path("identity", 2))
    delta = _size(fleet, delta_path("identity", 2, 1))
    assert delta < full / 2
    want = {"downloads": {"delta": {"devices": 2, "bytes": 2 * delta},
                          "full": {"devices": 2, "bytes": full + (full + delta)},
                          "bytes": 2 * delta + 2 * full + delta,
                          "full_release_bytes": 4 * full,
                          "saved_bytes": 4 * full - (3 * delta + 2 * full)},
            "waiting": {"window": 1, "app": 1},
            "engines": {"prebuilt": 2, "built": 2}}
    cli, live = _status_rows(fleet)
    for row in (cli, live):
        assert {k: row[k] for k in want} == want, row
        assert row["devices"] == {"waiting_window": 1, "waiting_app": 1, "committed": 2}

    text = run_outpost("fleet", "status", fleet.dir)
    assert text.returncode == 0, text.stderr
    assert (f"downloads: 2 as deltas ({2 * delta:,} bytes), 2 as full files "
            f"({2 * full + delta:,} bytes); {3 * delta + 2 * full:,} bytes sent of "
            f"{4 * full:,} as full files ({4 * full - 3 * delta - 2 * full:,} saved); "
            f"waiting: 1 for a window, 1 for their app; engines: 2 prebuilt, 2 built"
            ) in text.stdout, text.stdout

    # the window opens: a activates; b's app still holds it
    _pass(a, INSIDE)
    assert active_version(a.data) == 2
    cli, live = _status_rows(fleet)
    assert cli["waiting"] == live["waiting"] == {"window": 0, "app": 1}
    assert cli["downloads"] == live["downloads"] == want["downloads"]  # once a device

    # a fleet server started again rebuilds the same figures from its store
    fleet.stop()
    fleet.start()
    assert _status_rows(fleet)[1] == cli


def _post(fleet: Fleet, device: str, reports: list, url: str | None = None
          ) -> tuple[int, dict]:
    data = json.dumps({"reports": reports}).encode()
    req = urllib.request.Request(
        f"{url or fleet.url}/v1/reports", data=data, method="POST",
        headers={"Content-Type": "application/json",
                 **report_auth.sign(device_key(fleet.repo.report_secret(), device), device,
                                    data)})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


BAD_FIELDS = [  # (fields, what the answer says)
    ({"download": "delta"}, "reports[0].download must be an object"),
    ({"download": {"kind": "patch", "bytes": 1, "full_bytes": 2}},
     "reports[0].download.kind must be one of delta, full"),
    ({"download": {"kind": "full", "bytes": -1, "full_bytes": 2}},
     "reports[0].download.bytes must be a whole number of bytes >= 0"),
    ({"download": {"kind": "full", "bytes": 1.5, "full_bytes": 2}},
     "reports[0].download.bytes must be a whole number"),
    ({"download": {"kind": "full", "bytes": True, "full_bytes": 2}},
     "reports[0].download.bytes must be a whole number"),
    ({"download": {"kind": "full", "bytes": 1}},
     "reports[0].download.full_bytes must be a whole number"),
    ({"download": {"kind": "delta", "bytes": 1, "full_bytes": 2}},
     "reports[0].download.base_version must be the version the delta was applied to"),
    ({"download": {"kind": "full", "bytes": 1, "full_bytes": 2, "speed": 9}},
     "reports[0].download has an unknown field 'speed'"),
    ({"engine": "cached"}, "reports[0].engine 'cached': one of prebuilt, built"),
    ({"engine": 7}, "reports[0].engine '7': one of prebuilt, built"),
]


def test_a_bad_download_or_engine_field_is_refused_naming_it(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    ro = f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    f.start()
    try:
        report = {"device_id": "cam-ok", "model": "identity", "version": 2,
                  "rollout_id": ro.id, "state": "downloaded", "detail": "",
                  "ts": time.time(), "labels": {}}
        for i, (fields, says) in enumerate(BAD_FIELDS):  # a device each: POSTs in one ms
            status, body = _post(f, f"cam-{i}", [{**report, "device_id": f"cam-{i}",
                                                  **fields}])
            assert status == 400 and says in body["error"], (fields, body)
        with sqlite3.connect(f.dir / "fleet.db") as db:  # nothing stored
            assert db.execute("select count(*) from reports").fetchone()[0] == 0
        # the same report without the fields, as an agent from before them sends it
        assert _post(f, "cam-ok", [report]) == (200, {"accepted": 1, "ignored": []})
        [row] = [r for r in json.loads(run_outpost("fleet", "status", f.dir, "--json")
                                       .stdout) if r["version"] == 2]
        assert row["devices"] == {"downloaded": 1}
        assert row["downloads"]["bytes"] == row["engines"]["built"] == 0
    finally:
        f.stop()
    assert "Traceback" not in (f.dir / "server.log").read_text()


def test_the_tally_moved_report_by_report_equals_a_recount_of_the_newest_reports():
    rollout = Rollout(id="r1", fraction=1.0)
    rng = random.Random(24)
    states = ["downloading", "downloaded", "validated", "waiting_window", "waiting_app",
              "activated", "committed"]
    reports = []
    for i in range(400):
        state = rng.choice(states)
        download = ({"kind": rng.choice(["delta", "full"]), "bytes": rng.randrange(1, 900),
                     "full_bytes": 1000} if state == "downloaded" else None)
        engine = rng.choice(["prebuilt", "built"]) if state == "validated" else None
        reports.append((f"dev-{rng.randrange(30)}", state, float(rng.randrange(50)) + i % 3,
                        download, engine))
    tally = RolloutTally(rollout)
    for device, state, ts, download, engine in reports:  # in arrival order
        tally.see(device, {}, state, ts, download, engine)
    # a recount: each device's newest report by device time (the first of equals loses
    # to a later one, as in the store), its download and engine from the newest that
    # carried them and was taken
    newest: dict[str, tuple] = {}
    got: dict[str, dict] = {}
    eng: dict[str, str] = {}
    for device, state, ts, download, engine in reports:
        if device in newest and ts < newest[device][1]:
            continue
        newest[device] = (state, ts)
        if download:
            got[device] = download
        if engine:
            eng[device] = engine
    delivery = Counter()
    for g in got.values():
        delivery[g["kind"]] += g["bytes"]
        delivery[g["kind"] + "_devices"] += 1
        delivery["release"] += g["full_bytes"]
    want = fleet_view(delivery, Counter(s for s, _ in newest.values()), Counter(eng.values()))
    assert tally.view() == want
    assert want["waiting"]["window"] + want["waiting"]["app"] > 0 and want["engines"][
        "prebuilt"] > 0 and want["downloads"]["delta"]["devices"] > 0


@pytest.mark.skipif(pg_cluster.unavailable() is not None,
                    reason=str(pg_cluster.unavailable()))
def test_replicas_on_postgresql_count_what_the_other_took(tmp_path, demo_files):
    """Two fleet servers on one PostgreSQL: each shows the figures of every report,
    those it took and those the other did (fed to its tallies), as `fleet status --db`
    rebuilds them from the database."""
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    ro = f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    cluster = pg_cluster.LocalPostgres({"fsync": "off"}).start()
    replicas = []
    try:
        url = cluster.create_database("fleet_view")
        replicas = [Replica(f, url, name).start() for name in ("a", "b")]
        for i, (device, reports) in enumerate(travel_reports(ro.id).items()):
            status, body = _post(f, device, reports, replicas[i % 2].url)
            assert (status, body["accepted"]) == (200, len(reports)), body
        out = run_outpost("fleet", "status", f.dir, "--json", "--db", url)
        assert out.returncode == 0, out.stderr
        [rebuilt] = [r for r in json.loads(out.stdout) if r["version"] == 2]
        view = {k: rebuilt[k] for k in ("downloads", "waiting", "engines")}
        assert view["downloads"]["delta"] == {"devices": 2, "bytes": 1_234 + 98_765}
        assert view["waiting"] == {"window": 1, "app": 1}
        assert view["engines"] == {"prebuilt": 1, "built": 2}

        def shown(replica) -> dict:
            with urllib.request.urlopen(f"{replica.url}/v1/status", timeout=10) as resp:
                [row] = [r for r in json.loads(resp.read()) if r["version"] == 2]
            return {k: row[k] for k in view}

        for replica in replicas:
            wait_for(lambda r=replica: shown(r) == view, 30,
                     f"replica {replica.name} to count the other's reports")
    finally:
        for replica in replicas:
            replica.stop()
        cluster.remove()
