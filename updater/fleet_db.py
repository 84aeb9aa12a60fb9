"""The fleet server's store: device reports (an event log and each device's latest state
per rollout), each device's last report and when it was seen, the planner's progress,
and the rollout decisions the server signed.

One interface, ``FleetStore``, two implementations: SQLite (``FleetDB``, DIR/fleet.db
through sqlite-utils, the default, for one fleet server) and PostgreSQL
(``fleet_db_postgres.PostgresFleetDB``, for several replicas on one database).
``fleet_store.open_fleet_store`` picks one from the ``--db`` URL. The SQL both share is
written here once, with ``?`` placeholders; each implementation runs it on its own
connection.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

REPORT_STATES = ("downloading", "downloaded", "staged", "validated", "shadowing",
                 "shadow_waiting", "shadow_skipped", "shadow_passed", "rejected_in_shadow",
                 "activated", "committed", "failed", "rolled_back",
                 "waiting_window", "waiting_app", "deferral_expired")
SHADOW_STATES = {"shadowing", "shadow_waiting", "shadow_skipped", "shadow_passed",
                 "rejected_in_shadow"}
DECISION_FIELDS = ("id", "decided_at", "replica", "model", "version", "rollout_id",
                   "action", "base_version", "from_fraction", "to_fraction", "why",
                   "figures", "status", "targets_version", "finished_at")

# -- the SQL both stores run (``?`` placeholders) ---------------------------------------------

INSERT_REPORT = (
    "insert into reports (received_at, device_id, model, version, rollout_id, state, "
    "detail, labels, device_ts, shadow, download, engine) values (?,?,?,?,?,?,?,?,?,?,?,?)")
# Reports may arrive out of order from a device's queue: keep the newest, and a device's
# latest shadow figures, download (delta or full, bytes) and engine (prebuilt or built)
# past its later states.
UPSERT_STATE = (
    "insert into device_state (device_id, rollout_id, model, version, state, detail, "
    "labels, updated_at, shadow, download, engine) values (?,?,?,?,?,?,?,?,?,?,?) "
    "on conflict (device_id, rollout_id) do update set model = excluded.model, "
    "version = excluded.version, state = excluded.state, detail = excluded.detail, "
    "labels = excluded.labels, updated_at = excluded.updated_at, shadow = "
    "coalesce(excluded.shadow, device_state.shadow), download = "
    "coalesce(excluded.download, device_state.download), engine = "
    "coalesce(excluded.engine, device_state.engine) "
    "where excluded.updated_at >= device_state.updated_at")
# Columns a store from before them lacks: (table, column); added at open.
LATER_COLUMNS = (("reports", "shadow"), ("device_state", "shadow"),
                 ("reports", "download"), ("device_state", "download"),
                 ("reports", "engine"), ("device_state", "engine"))
UPSERT_DEVICE = (
    "insert into devices (device_id, labels, last_seen, model, version, rollout_id, "
    "state, detail, device_ts) values (?,?,?,?,?,?,?,?,?) "
    "on conflict (device_id) do update set last_seen = excluded.last_seen, "
    "labels = excluded.labels, model = excluded.model, version = excluded.version, "
    "rollout_id = excluded.rollout_id, state = excluded.state, detail = excluded.detail, "
    "device_ts = excluded.device_ts where excluded.device_ts >= devices.device_ts")
TOUCH_DEVICE = "update devices set last_seen = ? where device_id = ?"
UPSERT_PROGRESS = (
    "insert into plan_progress (rollout_id, fraction, met_since) values (?, ?, ?) "
    "on conflict (rollout_id) do update set fraction = excluded.fraction, "
    "met_since = excluded.met_since")
INSERT_DECISION = (
    "insert into decisions (decided_at, replica, model, version, rollout_id, action, "
    "base_version, from_fraction, to_fraction, why, figures, status) "
    "values (?,?,?,?,?,?,?,?,?,?,?,'signing') on conflict do nothing")


def report_rows(reports: list[dict], now: float) -> list[tuple]:
    """The ``reports`` rows of checked report maps, received at ``now``."""
    rows = []
    for r in reports:
        fig, got = r.get("shadow"), r.get("download")
        rows.append((now, r["device_id"], r["model"], r["version"], r["rollout_id"],
                     r["state"], r["detail"], json.dumps(r["labels"], sort_keys=True),
                     r["ts"], json.dumps(fig, sort_keys=True) if fig is not None else None,
                     json.dumps(got, sort_keys=True) if got is not None else None,
                     r.get("engine")))
    return rows


def add_statements(reports: list[dict], now: float) -> list[tuple[str, list[tuple]]]:
    """What storing reports writes: a fixed handful of statements a report, none of which
    reads the fleet's other rows, so the cost of a report does not grow with the fleet."""
    rows = report_rows(reports, now)
    return [
        (INSERT_REPORT, rows),
        (UPSERT_STATE, [(d, ro, m, v, st, de, lb, ts, sh, dl, en)
                        for _, d, m, v, ro, st, de, lb, ts, sh, dl, en in rows]),
        (UPSERT_DEVICE, [(d, lb, now, m, v, ro, st, de, ts)
                         for _, d, m, v, ro, st, de, lb, ts, *_ in rows]),
        (TOUCH_DEVICE, [(now, r["device_id"]) for r in reports])]


class FleetStore:
    """The interface the fleet server, its planner, the dashboard and the CLI use.

    Subclasses give ``_rows`` (a query's rows as tuples), ``_write`` (statements in one
    transaction), ``decision_lock`` and ``log_decision``; the rest is shared SQL.
    ``shared`` says whether other fleet servers may write the same store (then
    ``others_reports`` feeds this one what they took)."""

    shared = False
    replica = ""  # who wrote a decision: this server's name among the replicas

    # -- what each store gives --------------------------------------------------------------

    def _rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        raise NotImplementedError

    def _write(self, statements: list[tuple[str, list[tuple]]]) -> None:
        raise NotImplementedError

    def decision_lock(self) -> contextlib.AbstractContextManager:
        """Held while a decision is checked against the metadata and signed."""
        raise NotImplementedError

    def log_decision(self, d: dict) -> int | None:
        """Log a decision as 'signing' (committed); None if one with its rollout, action and
        base targets version is already logged."""
        raise NotImplementedError

    def others_reports(self) -> list[dict]:
        """Reports other fleet servers stored since the last call (none for SQLite)."""
        return []

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> FleetStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reports ------------------------------------------------------------------------------

    def add(self, reports: list[dict]) -> set[str]:
        """Store reports in one transaction; returns the rollout ids they touched. Returns
        only once they are committed: the server acknowledges a report after this."""
        self._write(add_statements(reports, time.time()))
        return {r["rollout_id"] for r in reports}

    def known_devices(self) -> dict[str, dict]:
        """Every device that ever reported, with its latest labels."""
        return {d: json.loads(lb) for d, lb in self._rows("select device_id, labels "
                                                          "from devices")}

    def devices(self) -> list[dict]:
        """Each device's last report, version, labels and when the fleet last heard it."""
        keys = ("device_id", "labels", "last_seen", "model", "version", "rollout_id",
                "state", "detail", "device_ts")
        return [{**dict(zip(keys, row)), "labels": json.loads(row[1])} for row in self._rows(
            f"select {', '.join(keys)} from devices order by device_id")]

    def latest(self, rollout_id: str) -> list[tuple[str, str, float, dict | None, str | None]]:
        """(device id, latest state, its device time, its download, its engine) of every
        device on a rollout."""
        return [(d, st, ts, json.loads(dl) if dl else None, en) for d, st, ts, dl, en in
                self._rows("select device_id, state, updated_at, download, engine from "
                           "device_state where rollout_id = ?", [rollout_id])]

    def has_rollout(self, rollout_id: str) -> bool:
        return bool(self._rows("select 1 from device_state where rollout_id = ? limit 1",
                               [rollout_id]))

    def states(self, rollout_id: str) -> list[tuple[str, dict, str]]:
        """(device id, labels, latest state) of every device that reported on a rollout."""
        return [(d, json.loads(lb), st) for d, lb, st in self._rows(
            "select device_id, labels, state from device_state where rollout_id = ?",
            [rollout_id])]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for rollout_id, state, n in self._rows("select rollout_id, state, count(*) from "
                                               "device_state group by rollout_id, state"):
            out.setdefault(rollout_id, {})[state] = n
        return out

    def report_count(self) -> int:
        return self._rows("select count(*) from reports")[0][0]

    def shadow_summary(self, rollout_id: str) -> dict:
        """A rollout's shadow phase over its devices (``summarize_shadow``)."""
        reported: dict[str, set[str]] = {}
        for device_id, state in self._rows("select distinct device_id, state from reports "
                                           "where rollout_id = ?", [rollout_id]):
            reported.setdefault(device_id, set()).add(state)
        return summarize_shadow(reported, self._rows(
            "select device_id, state, shadow from device_state where rollout_id = ?",
            [rollout_id]))

    # -- the planner's progress ----------------------------------------------------------------

    def progress(self, rollout_id: str) -> tuple[float, float] | None:
        """(fraction, since when its stage has met its figures) as the planner left it."""
        rows = self._rows("select fraction, met_since from plan_progress where "
                          "rollout_id = ?", [rollout_id])
        return (rows[0][0], rows[0][1]) if rows else None

    def set_progress(self, rollout_id: str, fraction: float, met_since: float | None,
                     ) -> None:
        if met_since is None:
            self._write([("delete from plan_progress where rollout_id = ?", [(rollout_id,)])])
        else:
            self._write([(UPSERT_PROGRESS, [(rollout_id, fraction, met_since)])])

    # -- the dashboard's queries ----------------------------------------------------------------

    def versions_by_state(self) -> list[tuple[str, int, str, int]]:
        """(model, version, state, devices) over each device's latest report."""
        return self._rows("select model, version, state, count(*) from devices "
                          "group by model, version, state")

    def reports_by_minute(self, start: float, end: float) -> list[tuple[int, str, int]]:
        """(minute since ``start``, state, reports) the server received in [start, end)."""
        raise NotImplementedError

    def stale_devices(self, since: float, limit: int) -> tuple[int, int, list[tuple]]:
        """(devices, devices last seen before ``since``, the ``limit`` longest silent:
        (id, labels, model, version, state, rollout id, last seen))."""
        total = self._rows("select count(*) from devices")[0][0]
        count = self._rows("select count(*) from devices where last_seen < ?", [since])[0][0]
        return total, count, self._rows(
            "select device_id, labels, model, version, state, rollout_id, last_seen "
            "from devices where last_seen < ? order by last_seen, device_id limit ?",
            [since, limit])

    # -- rollout decisions (updater/fleet_decisions.py) -----------------------------------------

    def finish_decision(self, decision_id: int, status: str,
                        targets_version: int | None) -> None:
        """A 'signing' decision is 'signed' (with the targets version it made) or
        'superseded' (the metadata moved on before it was signed)."""
        self._write([("update decisions set status = ?, targets_version = ?, finished_at = ?"
                      " where id = ?", [(status, targets_version, time.time(), decision_id)])])

    def decisions(self, rollout_id: str | None = None, status: str | None = None,
                  ) -> list[dict]:
        """Logged decisions, oldest first (``figures`` decoded)."""
        where, params = [], []
        for column, value in (("rollout_id", rollout_id), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self._rows(f"select {', '.join(DECISION_FIELDS)} from decisions"
                          + (f" where {' and '.join(where)}" if where else "")
                          + " order by id", params)
        return [{**dict(zip(DECISION_FIELDS, row)), "figures": json.loads(row[11] or "{}")}
                for row in rows]

    def last_decision_id(self) -> int:
        """Grows with each decision any server logs: a server that sees it move reloads
        the metadata it holds (another replica re-signed it)."""
        return self._rows("select coalesce(max(id), 0) from decisions")[0][0]

    def decision_params(self, d: dict) -> tuple:
        return (time.time(), self.replica, d["model"], d["version"], d["rollout_id"],
                d["action"], d["base_version"], d["from_fraction"], d["to_fraction"],
                d["why"], json.dumps(d["figures"], sort_keys=True))


def summarize_shadow(reported: dict[str, set[str]], latest: list[tuple]) -> dict:
    """A rollout's shadow phase over its devices: how many shadowed it and how each ended,
    the requests compared, the disagreement (over all requests, and the worst device's) and
    the worst device's p99 latency against its active version's. ``reported``: every state
    each device reported; ``latest``: (device id, latest state, shadow figures JSON)."""
    out = {"devices": 0, "shadowing": 0, "waiting": 0, "passed": 0, "rejected": 0,
           "skipped": 0, "no_verdict": 0, "requests": 0, "errors": 0, "shed": 0,
           "disagreement": 0.0, "worst_disagreement": 0.0, "worst_p99_ratio": None}
    disagreed = 0.0
    seen = set()
    for device_id, state, shadow in latest:
        states = reported.get(device_id, set())
        if not states & SHADOW_STATES:
            continue
        seen.add(device_id)
        out[_shadow_outcome(state, states)] += 1
        if shadow:
            fig = json.loads(shadow)
            judged = fig["requests"] + fig["errors"]
            out["requests"] += fig["requests"]
            out["errors"] += fig["errors"]
            out["shed"] += fig["shed"]
            disagreed += fig["disagreement"] * judged
            out["worst_disagreement"] = max(out["worst_disagreement"], fig["disagreement"])
            if fig["live_p99_ms"] > 0:
                ratio = round(fig["p99_ms"] / fig["live_p99_ms"], 3)
                out["worst_p99_ratio"] = max(out["worst_p99_ratio"] or 0.0, ratio)
    out["devices"] = len(seen)
    judged_all = out["requests"] + out["errors"]
    out["disagreement"] = round(disagreed / judged_all, 6) if judged_all else 0.0
    return out


def _shadow_outcome(latest: str, states: set[str]) -> str:
    """Where a device's shadow phase stands, from its latest state and all it reported."""
    for state, key in (("rejected_in_shadow", "rejected"), ("shadow_passed", "passed"),
                       ("shadow_skipped", "skipped")):
        if state in states:
            return key
    return {"shadowing": "shadowing", "shadow_waiting": "waiting"}.get(latest, "no_verdict")


class FleetDB(FleetStore):
    """The store in SQLite (DIR/fleet.db), for one fleet server process."""

    replica = "sqlite"

    def __init__(self, path: Path):
        # One connection, used one caller at a time (the server's lock), from the event
        # loop and from the worker thread that signs a decision.
        self.db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=False))
        self.db.conn.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
        # WAL with NORMAL: a commit (one a POST) does not wait on fsync; a power cut may
        # lose the last reports, never the database (devices report every state change)
        self.db.conn.execute("PRAGMA synchronous = NORMAL")
        self._decision_lock = threading.Lock()
        with self.db.conn:
            self.db["reports"].create(
                {"id": int, "received_at": float, "device_id": str, "model": str,
                 "version": int, "rollout_id": str, "state": str, "detail": str,
                 "labels": str, "device_ts": float, "shadow": str, "download": str,
                 "engine": str},
                pk="id", if_not_exists=True)
            self.db["device_state"].create(
                {"device_id": str, "rollout_id": str, "model": str, "version": int,
                 "state": str, "detail": str, "labels": str, "updated_at": float,
                 "shadow": str, "download": str, "engine": str},
                pk=("device_id", "rollout_id"), if_not_exists=True)
            for table, column in LATER_COLUMNS:  # a fleet.db from before them
                if column not in self.db[table].columns_dict:
                    self.db[table].add_column(column, str)
            self.db["devices"].create(
                {"device_id": str, "labels": str, "last_seen": float, "model": str,
                 "version": int, "rollout_id": str, "state": str, "detail": str,
                 "device_ts": float}, pk="device_id", if_not_exists=True)
            self.db["plan_progress"].create(
                {"rollout_id": str, "fraction": float, "met_since": float},
                pk="rollout_id", if_not_exists=True)
            self.db["decisions"].create(
                {"id": int, "decided_at": float, "replica": str, "model": str,
                 "version": int, "rollout_id": str, "action": str, "base_version": int,
                 "from_fraction": float, "to_fraction": float, "why": str, "figures": str,
                 "status": str, "targets_version": int, "finished_at": float},
                pk="id", if_not_exists=True)
            self.db.conn.execute("create unique index if not exists decisions_once on "
                                 "decisions (rollout_id, action, base_version)")
            self.db.conn.execute("create index if not exists reports_by_rollout on "
                                 "reports (rollout_id, device_id)")
            self.db.conn.execute("create index if not exists state_by_rollout on "
                                 "device_state (rollout_id)")
            if not self.db["devices"].count and self.db["device_state"].count:
                # a fleet.db from before the devices table: each device's newest state
                self.db.conn.execute(
                    "insert into devices select device_id, labels, max(updated_at), model, "
                    "version, rollout_id, state, detail, max(updated_at) from device_state "
                    "group by device_id")

    def close(self) -> None:
        self.db.conn.close()

    def _rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        return self.db.conn.execute(sql, params).fetchall()

    def _write(self, statements: list[tuple[str, list[tuple]]]) -> None:
        with self.db.conn as conn:
            for sql, rows in statements:
                conn.executemany(sql, rows)

    @contextlib.contextmanager
    def decision_lock(self) -> Iterator[None]:
        with self._decision_lock:  # one server a fleet.db: its threads take turns
            yield

    def log_decision(self, d: dict) -> int | None:
        with self.db.conn as conn:
            cur = conn.execute(INSERT_DECISION, self.decision_params(d))
        return cur.lastrowid if cur.rowcount == 1 else None

    def reports_by_minute(self, start: float, end: float) -> list[tuple[int, str, int]]:
        # received_at - start >= 0 here, so the cast truncates to the minute
        return self._rows(
            "select cast((received_at - ?) / 60 as integer) as m, state, count(*) "
            "from reports where id >= ? and received_at >= ? and received_at < ? "
            "group by m, state", [start, self.first_report_since(start), start, end])

    def first_report_since(self, since: float) -> int:
        """The lowest report id received at or after ``since``. Ids rise with received_at
        (one clock, rows appended), so a binary search over the primary key finds it in a
        few lookups: a dashboard polled all day never scans a year of reports."""
        conn = self.db.conn
        lo, hi = conn.execute("select coalesce(min(id), 0), coalesce(max(id), 0) + 1 "
                              "from reports").fetchone()
        while lo < hi:
            mid = (lo + hi) // 2
            row = conn.execute("select id, received_at from reports where id >= ? "
                               "order by id limit 1", [mid]).fetchone()
            if row is None or row[1] >= since:
                hi = mid
            else:
                lo = row[0] + 1
        return lo
