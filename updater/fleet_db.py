"""Device reports on the fleet side, in SQLite (sqlite-utils): an event log and each
device's latest state per rollout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlite_utils

REPORT_STATES = ("downloading", "downloaded", "staged", "validated", "shadowing",
                 "shadow_waiting", "shadow_skipped", "shadow_passed", "rejected_in_shadow",
                 "activated", "committed", "failed", "rolled_back",
                 "waiting_window", "waiting_app", "deferral_expired")


class FleetDB:
    def __init__(self, path: Path):
        self.db = sqlite_utils.Database(path)
        self.db.conn.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
        # WAL with NORMAL: a commit (one a POST) does not wait on fsync; a power cut may
        # lose the last reports, never the database (devices report every state change)
        self.db.conn.execute("PRAGMA synchronous = NORMAL")
        with self.db.conn:
            self.db["reports"].create(
                {"id": int, "received_at": float, "device_id": str, "model": str,
                 "version": int, "rollout_id": str, "state": str, "detail": str,
                 "labels": str, "device_ts": float, "shadow": str},
                pk="id", if_not_exists=True)
            self.db["device_state"].create(
                {"device_id": str, "rollout_id": str, "model": str, "version": int,
                 "state": str, "detail": str, "labels": str, "updated_at": float,
                 "shadow": str},
                pk=("device_id", "rollout_id"), if_not_exists=True)
            for table in ("reports", "device_state"):  # a fleet.db from before shadow phases
                if "shadow" not in self.db[table].columns_dict:
                    self.db[table].add_column("shadow", str)
            self.db["devices"].create(
                {"device_id": str, "labels": str, "last_seen": float, "model": str,
                 "version": int, "rollout_id": str, "state": str, "detail": str,
                 "device_ts": float}, pk="device_id", if_not_exists=True)
            self.db["plan_progress"].create(
                {"rollout_id": str, "fraction": float, "met_since": float},
                pk="rollout_id", if_not_exists=True)
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

    def __enter__(self) -> FleetDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, reports: list[dict]) -> set[str]:
        """Store reports in one transaction; returns the rollout ids they touched.

        A fixed handful of statements a report, none of which reads the fleet's other
        rows: the cost of a report does not grow with the fleet."""
        now = time.time()
        rows = []
        for r in reports:
            fig = r.get("shadow")
            rows.append((now, r["device_id"], r["model"], r["version"], r["rollout_id"],
                         r["state"], r["detail"], json.dumps(r["labels"], sort_keys=True),
                         r["ts"], json.dumps(fig, sort_keys=True) if fig is not None
                         else None))
        with self.db.conn as conn:
            conn.executemany(
                "insert into reports (received_at, device_id, model, version, rollout_id, "
                "state, detail, labels, device_ts, shadow) values (?,?,?,?,?,?,?,?,?,?)",
                rows)
            # Reports may arrive out of order from a device's queue: keep the newest, and
            # a device's latest shadow figures past its later states.
            conn.executemany(
                "insert into device_state (device_id, rollout_id, model, version, state, "
                "detail, labels, updated_at, shadow) values (?,?,?,?,?,?,?,?,?) "
                "on conflict (device_id, rollout_id) do update set model = excluded.model, "
                "version = excluded.version, state = excluded.state, detail = "
                "excluded.detail, labels = excluded.labels, updated_at = "
                "excluded.updated_at, shadow = coalesce(excluded.shadow, "
                "device_state.shadow) where excluded.updated_at >= device_state.updated_at",
                [(d, ro, m, v, st, de, lb, ts, sh)
                 for _, d, m, v, ro, st, de, lb, ts, sh in rows])
            conn.executemany(
                "insert into devices (device_id, labels, last_seen, model, version, "
                "rollout_id, state, detail, device_ts) values (?,?,?,?,?,?,?,?,?) "
                "on conflict (device_id) do update set last_seen = excluded.last_seen, "
                "labels = excluded.labels, model = excluded.model, version = "
                "excluded.version, rollout_id = excluded.rollout_id, state = "
                "excluded.state, detail = excluded.detail, device_ts = excluded.device_ts "
                "where excluded.device_ts >= devices.device_ts",
                [(d, lb, now, m, v, ro, st, de, ts)
                 for _, d, m, v, ro, st, de, lb, ts, _ in rows])
            conn.executemany("update devices set last_seen = ? where device_id = ?",
                             [(now, r["device_id"]) for r in reports])
        return {r["rollout_id"] for r in reports}

    def known_devices(self) -> dict[str, dict]:
        """Every device that ever reported, with its latest labels."""
        return {row[0]: json.loads(row[1]) for row in
                self.db.conn.execute("select device_id, labels from devices")}

    def devices(self) -> list[dict]:
        """Each device's last report, version, labels and when the fleet last heard it."""
        return [{**row, "labels": json.loads(row["labels"])} for row in self.db.query(
            "select device_id, labels, last_seen, model, version, rollout_id, state, "
            "detail, device_ts from devices order by device_id")]

    def latest(self, rollout_id: str) -> list[tuple[str, str, float]]:
        """(device id, latest state, its device time) of every device on a rollout."""
        return list(self.db.conn.execute(
            "select device_id, state, updated_at from device_state where rollout_id = ?",
            [rollout_id]))

    def has_rollout(self, rollout_id: str) -> bool:
        return self.db.conn.execute("select 1 from device_state where rollout_id = ? "
                                    "limit 1", [rollout_id]).fetchone() is not None

    def progress(self, rollout_id: str) -> tuple[float, float] | None:
        """(fraction, since when its stage has met its figures) as the planner left it."""
        row = self.db.conn.execute("select fraction, met_since from plan_progress where "
                                   "rollout_id = ?", [rollout_id]).fetchone()
        return (row[0], row[1]) if row else None

    def set_progress(self, rollout_id: str, fraction: float, met_since: float | None,
                     ) -> None:
        with self.db.conn as conn:
            if met_since is None:
                conn.execute("delete from plan_progress where rollout_id = ?", [rollout_id])
            else:
                conn.execute("insert or replace into plan_progress values (?, ?, ?)",
                             [rollout_id, fraction, met_since])

    def states(self, rollout_id: str) -> list[tuple[str, dict, str]]:
        """(device id, labels, latest state) of every device that reported on a rollout."""
        return [(row["device_id"], json.loads(row["labels"]), row["state"]) for row in
                self.db.query("select * from device_state where rollout_id = ?", [rollout_id])]

    def shadow_summary(self, rollout_id: str) -> dict:
        """A rollout's shadow phase over its devices: how many shadowed it and how each
        ended, the requests compared, the disagreement (over all requests, and the worst
        device's) and the worst device's p99 latency against its active version's."""
        out = {"devices": 0, "shadowing": 0, "waiting": 0, "passed": 0, "rejected": 0,
               "skipped": 0, "no_verdict": 0, "requests": 0, "errors": 0, "shed": 0,
               "disagreement": 0.0, "worst_disagreement": 0.0, "worst_p99_ratio": None}
        disagreed = 0.0
        seen = set()
        reported: dict[str, set[str]] = {}
        for device_id, state in self.db.conn.execute(
                "select distinct device_id, state from reports where rollout_id = ?",
                [rollout_id]):
            reported.setdefault(device_id, set()).add(state)
        for row in self.db.query("select device_id, state, shadow from device_state where "
                                 "rollout_id = ?", [rollout_id]):
            states = reported.get(row["device_id"], set())
            if not states & {"shadowing", "shadow_waiting", "shadow_skipped",
                             "shadow_passed", "rejected_in_shadow"}:
                continue
            seen.add(row["device_id"])
            out[_shadow_outcome(row["state"], states)] += 1
            if row["shadow"]:
                fig = json.loads(row["shadow"])
                judged = fig["requests"] + fig["errors"]
                out["requests"] += fig["requests"]
                out["errors"] += fig["errors"]
                out["shed"] += fig["shed"]
                disagreed += fig["disagreement"] * judged
                out["worst_disagreement"] = max(out["worst_disagreement"],
                                                fig["disagreement"])
                if fig["live_p99_ms"] > 0:
                    ratio = round(fig["p99_ms"] / fig["live_p99_ms"], 3)
                    out["worst_p99_ratio"] = max(out["worst_p99_ratio"] or 0.0, ratio)
        out["devices"] = len(seen)
        judged_all = out["requests"] + out["errors"]
        out["disagreement"] = round(disagreed / judged_all, 6) if judged_all else 0.0
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self.db.query("select rollout_id, state, count(*) as n from device_state "
                                 "group by rollout_id, state"):
            out.setdefault(row["rollout_id"], {})[row["state"]] = row["n"]
        return out


def _shadow_outcome(latest: str, states: set[str]) -> str:
    """Where a device's shadow phase stands, from its latest state and all it reported."""
    for state, key in (("rejected_in_shadow", "rejected"), ("shadow_passed", "passed"),
                       ("shadow_skipped", "skipped")):
        if state in states:
            return key
    return {"shadowing": "shadowing", "shadow_waiting": "waiting"}.get(latest, "no_verdict")
