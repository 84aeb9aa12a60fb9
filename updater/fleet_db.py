"""Device reports on the fleet side, in SQLite (sqlite-utils): an event log and each
device's latest state per rollout."""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlite_utils

REPORT_STATES = ("downloading", "downloaded", "staged", "validated", "shadowing",
                 "shadow_waiting", "shadow_skipped", "shadow_passed", "rejected_in_shadow",
                 "activated", "committed", "failed", "rolled_back")


class FleetDB:
    def __init__(self, path: Path):
        self.db = sqlite_utils.Database(path)
        self.db.conn.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
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

    def close(self) -> None:
        self.db.conn.close()

    def add(self, reports: list[dict]) -> set[str]:
        """Store reports in one transaction; returns the rollout ids they touched."""
        now = time.time()
        touched = set()
        with self.db.conn:
            for r in reports:
                labels = json.dumps(r["labels"], sort_keys=True)
                fig = r.get("shadow")
                shadow = json.dumps(fig, sort_keys=True) if fig is not None else None
                self.db["reports"].insert({
                    "received_at": now, "device_id": r["device_id"], "model": r["model"],
                    "version": r["version"], "rollout_id": r["rollout_id"],
                    "state": r["state"], "detail": r["detail"], "labels": labels,
                    "device_ts": r["ts"], "shadow": shadow})
                # Reports may arrive out of order from a device's queue: keep the newest.
                prev = list(self.db.query(
                    "select updated_at from device_state where device_id = ? and "
                    "rollout_id = ?", [r["device_id"], r["rollout_id"]]))
                if prev and prev[0]["updated_at"] > r["ts"]:
                    continue
                self.db["device_state"].upsert({
                    "device_id": r["device_id"], "rollout_id": r["rollout_id"],
                    "model": r["model"], "version": r["version"], "state": r["state"],
                    "detail": r["detail"], "labels": labels, "updated_at": r["ts"],
                    "shadow": shadow if shadow is not None else self._last_shadow(
                        r["device_id"], r["rollout_id"])},
                    pk=("device_id", "rollout_id"))
                touched.add(r["rollout_id"])
        return touched

    def states(self, rollout_id: str) -> list[tuple[str, dict, str]]:
        """(device id, labels, latest state) of every device that reported on a rollout."""
        return [(row["device_id"], json.loads(row["labels"]), row["state"]) for row in
                self.db.query("select * from device_state where rollout_id = ?", [rollout_id])]

    def _last_shadow(self, device_id: str, rollout_id: str) -> str | None:
        """A device's latest shadow figures on a rollout (kept past later states)."""
        rows = list(self.db.query(
            "select shadow from reports where device_id = ? and rollout_id = ? and shadow "
            "is not null order by device_ts desc limit 1", [device_id, rollout_id]))
        return rows[0]["shadow"] if rows else None

    def shadow_summary(self, rollout_id: str) -> dict:
        """A rollout's shadow phase over its devices: how many shadowed it and how each
        ended, the requests compared, the disagreement (over all requests, and the worst
        device's) and the worst device's p99 latency against its active version's."""
        out = {"devices": 0, "shadowing": 0, "waiting": 0, "passed": 0, "rejected": 0,
               "skipped": 0, "no_verdict": 0, "requests": 0, "errors": 0, "shed": 0,
               "disagreement": 0.0, "worst_disagreement": 0.0, "worst_p99_ratio": None}
        disagreed = 0.0
        seen = set()
        for row in self.db.query("select device_id, state, shadow from device_state where "
                                 "rollout_id = ?", [rollout_id]):
            states = {r["state"] for r in self.db.query(
                "select distinct state from reports where device_id = ? and rollout_id = ?",
                [row["device_id"], rollout_id])}
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
