"""Fleet servers over PostgreSQL: `outpost fleet serve --db postgresql://...` replicas on
one database and one repository.

The tests start their own throwaway PostgreSQL (updater/pg_cluster.py: Debian's
postgresql binaries, initdb in a temporary folder, 127.0.0.1 at a free port; as root the
server runs as the 'postgres' user) and skip, saying so, only where there are no
PostgreSQL binaries. Each test gets a database of its own.

- Two replicas under a simulated fleet, one SIGKILLed mid-run and started again: no
  acknowledged report lost, each stage of the plan advanced once, the bad release halted
  once, every targets version signed once and in order.
- Two replicas racing to advance the same stage: one signs, the other finds it done.
- A replica killed between logging a decision and signing it: the next settles it.
- PostgreSQL unreachable at start: one line, exit 1, no password in it.
- PostgreSQL stopped while serving: reports answered 503 and kept by a real device,
  repository files still served, taken again once the database is back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from tests.support.updater_support import (
    OUTPOST,
    Fleet,
    active_version,
    free_port,
    make_device,
    run_outpost,
    wait_for,
)
from updater import pg_cluster, report_auth
from updater.cohort import desired_version
from updater.fleet_decisions import Change, apply_change, settle, signed_rollout
from updater.fleet_repo import releases_from_targets
from updater.ingest_load import wait_listening
from updater.plans import Plan
from updater.report_auth import device_key

pytestmark = pytest.mark.skipif(pg_cluster.unavailable() is not None,
                                reason=str(pg_cluster.unavailable()))

DEVICES = 150
PLAN = Plan((0.1, 0.5, 1.0), soak_s=0.3, min_committed=0.95)
BAD_VERSION = 3  # every device that installs it fails


@pytest.fixture(scope="module")
def pg():
    cluster = pg_cluster.LocalPostgres({"fsync": "off"}).start()
    yield cluster
    cluster.remove()


@pytest.fixture
def db_url(pg):
    return pg.create_database(f"fleet_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def fleet(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    for version in (1, 2, 3):
        f.publish("identity", version, demo_files["identity"])
    yield f
    f.stop()


class Replica:
    """One `outpost fleet serve DIR --db URL` process on a port of its own."""

    def __init__(self, fleet: Fleet, db_url: str, name: str):
        self.fleet, self.db_url, self.name = fleet, db_url, name
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = fleet.dir / f"replica-{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Replica:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*OUTPOST, "fleet", "serve", str(self.fleet.dir), "--db", self.db_url,
                 "--port", str(self.port), "--plan-check-s", "0.1",
                 "--timestamp-check-s", "0"], stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, self.log_path, 60, f"replica {self.name}")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            assert self.proc.wait(20) == 0, self.log_path.read_text()[-3000:]


def _post(url: str, secret: bytes, device: str, reports: list[dict]) -> tuple[int, dict]:
    data = json.dumps({"reports": reports}).encode()
    req = urllib.request.Request(
        f"{url}/v1/reports", data=data, method="POST",
        headers={"Content-Type": "application/json",
                 **report_auth.sign(device_key(secret, device), device, data)})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {**json.loads(exc.read()), "retry_after": exc.headers["Retry-After"]}


def _report(device: str, rollout_id: str, state: str, version: int = 2) -> dict:
    return {"device_id": device, "model": "identity", "version": version,
            "rollout_id": rollout_id, "state": state, "detail": "", "ts": time.time(),
            "labels": {"site": "a"}}


def _rows(url: str, sql: str, params=()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


# -- a simulated fleet under two replicas ------------------------------------------------------

class SimFleet:
    """DEVICES simulated devices, each with its own report key, its queue of unsent
    reports and a replica it talks to (the next one when that fails). How one differs
    from a real device: no appliance under it, an install is two reports (downloading,
    then committed, or failed for BAD_VERSION, which it then marks bad); and each round
    every device decides on the same signed targets metadata, fetched once a round over
    HTTP from a live replica (timestamp -> snapshot -> N.targets.json), instead of each
    refreshing it on its own."""

    def __init__(self, fleet: Fleet, replicas: list[Replica]):
        self.fleet, self.replicas = fleet, replicas
        self.secret = fleet.repo.report_secret()
        self.ids = [f"dev-{i:04d}" for i in range(DEVICES)]
        self.keys = {d: device_key(self.secret, d) for d in self.ids}
        self.version = dict.fromkeys(self.ids)
        self.bad: dict[str, set[int]] = {d: set() for d in self.ids}
        self.queue: dict[str, list[dict]] = {d: [] for d in self.ids}
        self.talks_to = {d: i % len(replicas) for i, d in enumerate(self.ids)}
        self.acked: list[tuple[str, str, float]] = []  # (device, state, ts) answered 200
        self.failovers = 0

    def _live(self) -> Replica:
        return next(r for r in self.replicas if r.proc.poll() is None)

    async def _get(self, session, path: str) -> bytes:
        async with session.get(f"{self._live().url}/metadata/{path}") as resp:
            assert resp.status == 200, (path, resp.status)
            return await resp.read()

    async def releases(self, session):
        from tuf.api.metadata import Metadata

        ts = Metadata.from_bytes(await self._get(session, "timestamp.json")).signed
        snap = Metadata.from_bytes(await self._get(
            session, f"{ts.snapshot_meta.version}.snapshot.json")).signed
        version = snap.meta["targets.json"].version
        return releases_from_targets(Metadata.from_bytes(await self._get(
            session, f"{version}.targets.json")).signed)

    async def round(self, session) -> None:
        releases = await self.releases(session)
        for d in self.ids:
            rel = desired_version(releases, "identity", d, {"site": "a"}, bad=self.bad[d],
                                  current=self.version[d])
            if rel is None or rel.version == self.version[d]:
                continue
            ok = rel.version != BAD_VERSION
            for state in ("downloading", "committed" if ok else "failed"):
                self.queue[d].append(_report(d, rel.rollout.id, state, rel.version))
            if ok:
                self.version[d] = rel.version
            else:
                self.bad[d].add(rel.version)
        limit = asyncio.Semaphore(16)

        async def flush(d: str) -> None:
            async with limit:
                await self._flush(session, d)
        await asyncio.gather(*(flush(d) for d in self.ids if self.queue[d]))

    async def _flush(self, session, d: str) -> None:
        import aiohttp

        reports = list(self.queue[d])
        body = json.dumps({"reports": reports}).encode()
        url = self.replicas[self.talks_to[d]].url
        try:
            async with session.post(f"{url}/v1/reports", data=body, headers={
                    "Content-Type": "application/json",
                    **report_auth.sign(self.keys[d], d, body)}) as resp:
                answer = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, OSError):
            status, answer = None, None
        if status != 200:  # kept; the next round sends them to the next replica
            assert status in (None, 503), (status, answer)
            self.talks_to[d] = (self.talks_to[d] + 1) % len(self.replicas)
            self.failovers += 1
            return
        assert answer == {"accepted": len(reports), "ignored": []}, answer
        self.acked += [(r["device_id"], r["state"], r["ts"]) for r in reports]
        del self.queue[d][:len(reports)]

    def unsent(self) -> int:
        return sum(len(q) for q in self.queue.values())


def _targets_versions(fleet: Fleet) -> dict[int, dict]:
    """Every signed targets version: version -> {model version: rollout custom}."""
    from tuf.api.metadata import Metadata

    out = {}
    for path in (fleet.dir / "metadata").glob("*.targets.json"):
        signed = Metadata.from_file(str(path)).signed
        assert int(path.name.split(".")[0]) == signed.version
        out[signed.version] = {r.version: r.rollout for r in releases_from_targets(signed)}
    return out


def test_two_replicas_and_one_killed_mid_run_lose_no_report_and_decide_once(
        fleet, db_url):
    fleet.repo.set_rollout("identity", 1, new=True, fraction=1.0)
    a = Replica(fleet, db_url, "a").start()
    b = Replica(fleet, db_url, "b").start()
    sim = SimFleet(fleet, [a, b])

    async def scenario() -> dict:
        import aiohttp

        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32),
                timeout=aiohttp.ClientTimeout(total=30)) as session:
            await sim.round(session)  # every device on v1: the fleet knows it
            assert sim.unsent() == 0
            v2 = fleet.repo.set_rollout("identity", 2, new=True, fraction=PLAN.stages[0],
                                        failure_threshold=0.1, min_reports=3, plan=PLAN)
            killed = restarted = False
            for _ in range(200):
                if not killed and fleet.repo.release("identity", 2).rollout.fraction >= 0.5:
                    # SIGKILL replica a while the devices' POSTs are in flight
                    posting = asyncio.create_task(sim.round(session))
                    await asyncio.sleep(0.05)
                    a.kill()
                    killed = True
                    await posting
                elif killed and not restarted and sim.failovers:
                    a.start()  # the same replica comes back on the same port
                    restarted = True
                else:
                    await sim.round(session)
                if all(v == 2 for v in sim.version.values()) and restarted:
                    break
                await asyncio.sleep(0.1)
            assert all(v == 2 for v in sim.version.values()), sim.version
            v3 = fleet.repo.set_rollout("identity", BAD_VERSION, new=True,
                                        fraction=PLAN.stages[0], failure_threshold=0.1,
                                        min_reports=3, plan=PLAN)
            for _ in range(200):
                await sim.round(session)
                if fleet.repo.release("identity", BAD_VERSION).rollout.state == "halted":
                    break
                await asyncio.sleep(0.1)
            for _ in range(50):  # what is still queued, sent
                await sim.round(session)
                if not sim.unsent():
                    break
                await asyncio.sleep(0.2)
            async with session.get(f"{b.url}/v1/dashboard") as resp:
                dashboard = await resp.json()
            return {"v2": v2, "v3": v3, "dashboard": dashboard}

    try:
        rollouts = asyncio.run(scenario())
        # both replicas have settled what they decide before their logs are read
        time.sleep(1.0)
    finally:
        for r in (a, b):
            r.stop()
    v2, v3 = rollouts["v2"], rollouts["v3"]
    assert sim.unsent() == 0 and sim.failovers > 0

    # No acknowledged report lost: each one answered 200 is a row.
    stored = _rows(db_url, "select device_id, state, device_ts from reports")
    assert len(sim.acked) > 2 * DEVICES
    assert set(sim.acked) <= set(stored), len(set(sim.acked) - set(stored))

    # Each stage of v2 advanced once, v3 halted once; all signed, none left open.
    decisions = _rows(db_url, "select id, rollout_id, action, from_fraction, to_fraction, "
                              "status, targets_version, replica from decisions order by id")
    assert [(d[1], d[2], d[3], d[4], d[5]) for d in decisions] == [
        (v2.id, "advance", 0.1, 0.5, "signed"), (v2.id, "advance", 0.5, 1.0, "signed"),
        (v3.id, "halt", 0.1, None, "signed")], decisions
    assert fleet.repo.release("identity", 2).rollout.state == "active"
    final_v3 = fleet.repo.release("identity", BAD_VERSION).rollout
    assert (final_v3.state, final_v3.fraction) == ("halted", 0.1)
    assert all(v == 2 for v in sim.version.values())  # the halted release left no device

    # Every targets version signed once, in order: none missing, none written twice,
    # and each decision's version is the one that shows its change.
    signed = _targets_versions(fleet)
    assert sorted(signed) == list(range(1, max(signed) + 1))
    versions = [d[6] for d in decisions]
    assert versions == sorted(set(versions)), versions
    for (_, rollout_id, action, _, to, _, version, _) in decisions:
        model_version = 2 if rollout_id == v2.id else BAD_VERSION
        before, after = signed[version - 1][model_version], signed[version][model_version]
        if action == "advance":
            assert (before.fraction, after.fraction) == (PLAN.stages[PLAN.stages.index(to)
                                                                      - 1], to)
        else:
            assert (before.state, after.state) == ("active", "halted")
    # v2's fraction changed in exactly two re-signs; v3's state in exactly one
    def seen(model_version: int, rollout_id: str, what: str) -> list:
        return [k for k, _ in itertools.groupby(
            getattr(signed[v][model_version], what) for v in sorted(signed)
            if getattr(signed[v].get(model_version), "id", None) == rollout_id)]
    assert seen(2, v2.id, "fraction") == [0.1, 0.5, 1.0]
    assert seen(BAD_VERSION, v3.id, "state") == ["active", "halted"]
    history = fleet.repo.release("identity", 2).rollout.history
    assert [f for f, _ in history] == [0.1, 0.5, 1.0]
    for r in (a, b):
        assert "Traceback" not in r.log_path.read_text()
    # The dashboard, `fleet status` and `fleet devices` read the same database
    by_version = {v["version"]: v["states"] for v in rollouts["dashboard"]["versions"]}
    tried_v3 = sum(BAD_VERSION in bad for bad in sim.bad.values())
    assert by_version == {2: {"committed": DEVICES - tried_v3},
                          BAD_VERSION: {"failed": tried_v3}}, by_version
    assert rollouts["dashboard"]["reports_per_minute"]["total"] == len(stored)
    out = run_outpost("fleet", "status", fleet.dir, "--json", "--db", db_url)
    status = {r["version"]: r for r in json.loads(out.stdout)}
    assert status[2]["devices"] == {"committed": DEVICES}, out.stderr
    assert status[BAD_VERSION]["rollout"]["state"] == "halted"
    out = run_outpost("fleet", "devices", fleet.dir, "--json", env={"OUTPOST_FLEET_DB": db_url})
    assert sorted(d["device_id"] for d in json.loads(out.stdout)) == sim.ids, out.stderr


# -- racing replicas, and a decision a killed replica left open --------------------------------

def _store(url: str, name: str):
    from updater.fleet_db_postgres import PostgresFleetDB

    return PostgresFleetDB(url, replica=name)


def test_two_replicas_racing_to_advance_the_same_stage_sign_it_once(fleet, db_url):
    rollout = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.1, plan=PLAN)
    stores = [_store(db_url, "a"), _store(db_url, "b")]
    try:
        for frm, to in ((0.1, 0.5), (0.5, 1.0)):
            before = signed_rollout(fleet.repo, "identity", 2)[0]
            start = threading.Barrier(2)
            results: dict[str, int | None] = {}

            def race(store, frm=frm, to=to, start=start, results=results) -> None:
                start.wait()
                results[store.replica] = apply_change(fleet.repo, store, Change(
                    "identity", 2, rollout.id, "advance", frm, to, "figures held",
                    {"committed": 9}))
            threads = [threading.Thread(target=race, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            # One signed the next targets version; the other found the stage advanced.
            assert sorted(results.values(), key=lambda v: v is None) == [before + 1, None]
            assert signed_rollout(fleet.repo, "identity", 2) == (
                before + 1, fleet.repo.release("identity", 2).rollout)
            assert fleet.repo.release("identity", 2).rollout.fraction == to
        rows = _rows(db_url, "select from_fraction, to_fraction, status from decisions "
                             "order by id")
        assert rows == [(0.1, 0.5, "signed"), (0.5, 1.0, "signed")]
    finally:
        for s in stores:
            s.close()


def test_a_decision_left_open_by_a_killed_replica_is_settled_by_the_next(fleet, db_url):
    """A replica logs a decision ('signing'), then dies before signing it, or after
    signing but before marking it: whoever takes the lock next settles it, once."""
    rollout = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.1, plan=PLAN)
    dead, alive = _store(db_url, "dead"), _store(db_url, "alive")
    try:
        base = signed_rollout(fleet.repo, "identity", 2)[0]
        dead.log_decision({"model": "identity", "version": 2, "rollout_id": rollout.id,
                           "action": "advance", "base_version": base, "from_fraction": 0.1,
                           "to_fraction": 0.5, "why": "figures held", "figures": {}})
        dead.close()  # died before signing
        assert settle(fleet.repo, alive) == 1
        assert fleet.repo.release("identity", 2).rollout.fraction == 0.5
        assert _rows(db_url, "select status, targets_version from decisions") == [
            ("signed", base + 1)]

        dead = _store(db_url, "dead")
        base = signed_rollout(fleet.repo, "identity", 2)[0]
        dead.log_decision({"model": "identity", "version": 2, "rollout_id": rollout.id,
                           "action": "halt", "base_version": base, "from_fraction": 0.5,
                           "to_fraction": None, "why": "failures", "figures": {}})
        # It signed the targets, then died before the snapshot and timestamp named them.
        chain = {role: (fleet.dir / "metadata" / f"{role}.json").read_bytes()
                 for role in ("snapshot", "timestamp")}
        fleet.repo.set_rollout("identity", 2, state="halted")
        for role, raw in chain.items():
            (fleet.dir / "metadata" / f"{role}.json").write_bytes(raw)
        dead.close()
        assert settle(fleet.repo, alive) == 1
        assert signed_rollout(fleet.repo, "identity", 2)[0] == base + 1  # not signed again
        snapshot = json.loads((fleet.dir / "metadata" / "snapshot.json").read_bytes())
        assert snapshot["signed"]["meta"]["targets.json"]["version"] == base + 1
        timestamp = json.loads((fleet.dir / "metadata" / "timestamp.json").read_bytes())
        assert timestamp["signed"]["meta"]["snapshot.json"]["version"] == \
            snapshot["signed"]["version"]
        assert _rows(db_url, "select action, status, targets_version from decisions "
                             "order by id") == [("advance", "signed", base),
                                                ("halt", "signed", base + 1)]
        assert settle(fleet.repo, alive) == 0
    finally:
        alive.close()


# -- PostgreSQL unreachable at start, and lost while serving -----------------------------------

def test_an_unreachable_database_at_start_is_one_line_and_exit_1(fleet, pg):
    port = free_port()  # nothing listens there
    url = f"postgresql://outpost:sekret@127.0.0.1:{port}/fleet"
    for args, env in ((["--db", url], None), ([], {"OUTPOST_FLEET_DB": url})):
        out = run_outpost("fleet", "serve", fleet.dir, "--port", free_port(), *args, env=env,
                          timeout=60)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1, out.stderr
        assert f"can't reach PostgreSQL at postgresql://outpost@127.0.0.1:{port}/fleet" \
            in lines[0] and "OUTPOST_FLEET_DB" in lines[0], lines
        assert "sekret" not in out.stderr + out.stdout and "Traceback" not in out.stderr
    # A database the server does not have; a store that is not PostgreSQL.
    for db, words in ((pg.url("no_such_fleet"), 'database "no_such_fleet" does not exist'),
                      ("mysql://fleet@127.0.0.1/fleet", "the fleet store is 'sqlite'")):
        out = run_outpost("fleet", "serve", fleet.dir, "--db", db, timeout=60)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert words in out.stderr, out.stderr
    assert not (fleet.dir / "fleet.db").exists()  # nothing made on the side


def test_reports_are_answered_503_and_kept_while_the_database_is_down(
        tmp_path, short_tmp, demo_files):
    pg = pg_cluster.LocalPostgres({"fsync": "off"}).start()  # this test stops it
    fleet = Fleet(tmp_path / "fleet")
    try:
        url = pg.create_database("fleet")
        fleet.publish("identity", 2, demo_files["identity"])
        rollout = fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
        fleet.start("--db", url, "--timestamp-check-s", "0")
        secret = fleet.repo.report_secret()
        assert _post(fleet.url, secret, "probe", [_report("probe", rollout.id,
                                                          "downloading")])[0] == 200
        pg.stop("fast")

        # Reports: 503 saying why, nothing stored. Repository files: still served.
        refused = _report("probe", rollout.id, "committed")
        status, answer = _post(fleet.url, secret, "probe", [refused])
        assert status == 503 and "PostgreSQL at postgresql://outpost@127.0.0.1" in \
            answer["error"] and answer["retry_after"] == "5", answer
        for path in ("timestamp.json", "1.root.json"):
            with urllib.request.urlopen(f"{fleet.url}/metadata/{path}", timeout=10) as resp:
                assert resp.status == 200 and resp.read() == \
                    (fleet.dir / "metadata" / path).read_bytes()

        # A real device updates meanwhile (files served) and keeps its reports.
        data = short_tmp / "dev"
        config = make_device(data, fleet, demo_files["identity"], device_id="dev-1")
        result = run_outpost("update", "check", "--config", config)
        assert active_version(data) == 2, result.stdout + result.stderr
        with sqlite3.connect(data / "state.db") as db:
            kept = [json.loads(r[0])["state"] for r in
                    db.execute("select body from update_reports order by id")]
        assert kept and kept[-1] == "committed", kept

        pg.start()  # the database returns: the server reconnects by itself
        wait_for(lambda: _post(fleet.url, secret, "probe", [_report(
            "probe", rollout.id, "committed")])[0] == 200, 60, "reports taken again")
        run_outpost("update", "check", "--config", config)
        with sqlite3.connect(data / "state.db") as db:
            assert db.execute("select count(*) from update_reports").fetchone()[0] == 0
        states = [r[0] for r in _rows(url, "select state from reports where device_id = "
                                           "'dev-1' order by id")]
        assert states == kept, states
        # the report answered 503 was not half-written: it is nowhere
        assert _rows(url, "select count(*) from reports where device_ts = %s",
                     [refused["ts"]]) == [(0,)]
        fleet.stop()
        log = (fleet.dir / "server.log").read_text()
        assert "Traceback" not in log and "PostgreSQL at" in log and "is back" in log, log
    finally:
        fleet.stop()
        pg.remove()


def test_sqlite_stays_the_default_and_keeps_its_decisions(fleet):
    """No --db: DIR/fleet.db, with the decision log too (one store interface)."""
    from updater.fleet_db import FleetDB

    rollout = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.1, plan=PLAN)
    with FleetDB(fleet.dir / "fleet.db") as db:
        version = apply_change(fleet.repo, db, Change("identity", 2, rollout.id, "advance",
                                                      0.1, 0.5, "held", {}))
        assert version is not None and apply_change(fleet.repo, db, Change(
            "identity", 2, rollout.id, "advance", 0.1, 0.5, "held", {})) is None
        assert [(d["action"], d["status"], d["targets_version"]) for d in db.decisions()] \
            == [("advance", "signed", version)]
    assert os.path.getsize(fleet.dir / "fleet.db") > 0
