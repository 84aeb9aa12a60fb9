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
                 "labels": str, "device_ts": float},
                pk="id", if_not_exists=True)
            self.db["device_state"].create(
                {"device_id": str, "rollout_id": str, "model": str, "version": int,
                 "state": str, "detail": str, "labels": str, "updated_at": float},
                pk=("device_id", "rollout_id"), if_not_exists=True)

    def close(self) -> None:
        self.db.conn.close()

    def add(self, reports: list[dict]) -> set[str]:
        """Store reports in one transaction; returns the rollout ids they touched."""
        now = time.time()
        touched = set()
        with self.db.conn:
            for r in reports:
                labels = json.dumps(r["labels"], sort_keys=True)
                self.db["reports"].insert({
                    "received_at": now, "device_id": r["device_id"], "model": r["model"],
                    "version": r["version"], "rollout_id": r["rollout_id"],
                    "state": r["state"], "detail": r["detail"], "labels": labels,
                    "device_ts": r["ts"]})
                # Reports may arrive out of order from a device's queue: keep the newest.
                prev = list(self.db.query(
                    "select updated_at from device_state where device_id = ? and "
                    "rollout_id = ?", [r["device_id"], r["rollout_id"]]))
                if prev and prev[0]["updated_at"] > r["ts"]:
                    continue
                self.db["device_state"].upsert({
                    "device_id": r["device_id"], "rollout_id": r["rollout_id"],
                    "model": r["model"], "version": r["version"], "state": r["state"],
                    "detail": r["detail"], "labels": labels, "updated_at": r["ts"]},
                    pk=("device_id", "rollout_id"))
                touched.add(r["rollout_id"])
        return touched

    def states(self, rollout_id: str) -> list[tuple[str, dict, str]]:
        """(device id, labels, latest state) of every device that reported on a rollout."""
        return [(row["device_id"], json.loads(row["labels"]), row["state"]) for row in
                self.db.query("select * from device_state where rollout_id = ?", [rollout_id])]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in self.db.query("select rollout_id, state, count(*) as n from device_state "
                                 "group by rollout_id, state"):
            out.setdefault(row["rollout_id"], {})[row["state"]] = row["n"]
        return out
