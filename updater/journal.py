"""The update journal: every step is written to SQLite before it has effects.

One row per update (model, version) with the step it is in; a process killed at any
point finds the open row on restart and resumes or rolls back from that step. Reports
for the fleet queue here too, until the fleet takes them.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils


class Step(enum.StrEnum):
    DOWNLOAD = "download"  # fetching into staging/downloads/<sha256>.part
    STAGE = "stage"  # verified; unpacking and adding it to the repository
    PREPARE = "prepare"  # in the repository; engine prepare and validation
    SHADOW = "shadow"  # validated; shadowing the active version on live traffic (the
    # rollout's shadow phase): figures live in the serving process, so a restart
    # starts the window again
    READY = "ready"  # validated (shadow passed); the release's activation policy holds it
    # until its window or the app's word (updater/activation.py): a restart keeps waiting
    ACTIVATE = "activate"  # validated; switching the active version
    WATCH = "watch"  # active; health watch before commit
    ROLLBACK = "rollback"  # returning to the previous version
    DONE = "done"  # outcome says how it ended


OUTCOMES = ("committed", "rolled_back", "failed", "abandoned", "rejected_in_shadow")


@dataclass(frozen=True)
class Update:
    id: int
    model: str
    version: int
    target_path: str
    rollout_id: str
    length: int
    sha256: str
    previous: int | None
    step: Step
    outcome: str
    watch_restarts: int
    detail: str
    baseline: str  # JSON of the previous version's health when the new one went active
    shadow: str = ""  # JSON of the rollout's shadow limits ("": no shadow phase)
    activation: str = ""  # JSON of the release's activation policy ("": at once)
    ready_at: float | None = None  # unix time it became ready to activate (step READY)
    app_action: str = ""  # the local app's last word: "", "allow" or "defer"
    app_until: float | None = None  # "defer": until this unix time (None: the maximum)
    waiting: str = ""  # what it waits for, as last reported (reported again on a change)
    download: str = ""  # JSON: how the release came (delta or full, bytes), for the report


class Journal:
    def __init__(self, path: Path):
        # One agent uses it from the loop and, one step at a time, from worker threads.
        self.db = sqlite_utils.Database(sqlite3.connect(path, check_same_thread=False))
        self.db.conn.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
        with self.db.conn:
            self.db["update_journal"].create(
                {"id": int, "model": str, "version": int, "target_path": str,
                 "rollout_id": str, "length": int, "sha256": str, "previous": int,
                 "step": str, "outcome": str, "watch_restarts": int, "detail": str,
                 "baseline": str, "shadow": str, "started_at": float,
                 "updated_at": float},
                pk="id", if_not_exists=True)
            for column, kind in (("shadow", str), ("activation", str), ("ready_at", float),
                                 ("app_action", str), ("app_until", float),
                                 ("waiting", str),  # a journal from before these
                                 ("download", str)):
                if column not in self.db["update_journal"].columns_dict:
                    self.db["update_journal"].add_column(column, kind)
            self.db["update_steps"].create(
                {"id": int, "update_id": int, "ts": float, "step": str, "detail": str},
                pk="id", if_not_exists=True)
            self.db["update_reports"].create(
                {"id": int, "body": str}, pk="id", if_not_exists=True)
            self.db["update_reports_dropped"].create(  # one row: dropped while offline
                {"id": int, "count": int}, pk="id", if_not_exists=True)
            self.db["update_bad"].create(
                {"model": str, "version": int, "why": str, "ts": float},
                pk=("model", "version"), if_not_exists=True)

    def close(self) -> None:
        self.db.conn.close()

    def _row(self, row: dict) -> Update:
        return Update(row["id"], row["model"], row["version"], row["target_path"],
                      row["rollout_id"], row["length"], row["sha256"], row["previous"],
                      Step(row["step"]), row["outcome"] or "", row["watch_restarts"] or 0,
                      row["detail"] or "", row["baseline"] or "", row.get("shadow") or "",
                      row.get("activation") or "", row.get("ready_at"),
                      row.get("app_action") or "", row.get("app_until"),
                      row.get("waiting") or "", row.get("download") or "")

    def open_updates(self) -> list[Update]:
        return [self._row(r) for r in self.db.query(
            "select * from update_journal where step != 'done' order by id")]

    def get(self, update_id: int) -> Update:
        return self._row(self.db["update_journal"].get(update_id))

    def history(self, model: str | None = None) -> list[Update]:
        rows = self.db.query("select * from update_journal order by id") if model is None \
            else self.db.query("select * from update_journal where model = ? order by id",
                               [model])
        return [self._row(r) for r in rows]

    def steps(self, update_id: int) -> list[tuple[str, str]]:
        return [(r["step"], r["detail"]) for r in self.db.query(
            "select step, detail from update_steps where update_id = ? order by id",
            [update_id])]

    def begin(self, model: str, version: int, target_path: str, *, rollout_id: str,
              length: int, sha256: str, previous: int | None, shadow: str = "",
              activation: str = "") -> Update:
        now = time.time()
        with self.db.conn:
            uid = self.db["update_journal"].insert({
                "model": model, "version": version, "target_path": target_path,
                "rollout_id": rollout_id, "length": length, "sha256": sha256,
                "previous": previous, "step": Step.DOWNLOAD.value, "outcome": "",
                "watch_restarts": 0, "detail": "", "baseline": "", "shadow": shadow,
                "activation": activation,
                "started_at": now,
                "updated_at": now,
            }).last_pk
            self._log(uid, Step.DOWNLOAD, "")
        return self.get(uid)

    def advance(self, update: Update, step: Step, detail: str = "", outcome: str = "",
                **fields) -> Update:
        """Record the step about to be taken (one transaction, before its effects)."""
        with self.db.conn:
            self.db["update_journal"].update(update.id, {
                "step": step.value, "detail": detail, "outcome": outcome,
                "updated_at": time.time(), **fields})
            self._log(update.id, step, outcome or detail)
        return self.get(update.id)

    def remember(self, update: Update, detail: str, **fields) -> Update:
        """Change ``fields`` of the update in its step (the app's word, what it waits
        for), with ``detail`` in its log."""
        with self.db.conn:
            self.db["update_journal"].update(update.id, {"updated_at": time.time(), **fields})
            self._log(update.id, update.step, detail)
        return self.get(update.id)

    def note(self, update: Update, detail: str) -> None:
        with self.db.conn:
            self._log(update.id, update.step, detail)

    def _log(self, uid: int, step: Step, detail: str) -> None:
        self.db["update_steps"].insert({"update_id": uid, "ts": time.time(),
                                        "step": step.value, "detail": detail})

    # -- locally bad versions ------------------------------------------------------------

    def mark_bad(self, model: str, version: int, why: str) -> None:
        with self.db.conn:
            self.db["update_bad"].upsert({"model": model, "version": version, "why": why,
                                          "ts": time.time()}, pk=("model", "version"))

    def bad(self, model: str) -> set[int]:
        return {r["version"] for r in self.db.query(
            "select version from update_bad where model = ?", [model])}

    # -- the report queue ----------------------------------------------------------------

    def queue_report(self, report: dict, keep: int = 1000) -> int:
        """Queue ``report``; past ``keep`` queued, the oldest go (counted). Returns how
        many were dropped now."""
        with self.db.conn:
            self.db["update_reports"].insert({"body": json.dumps(report)})
            over = self.db.execute("select count(*) from update_reports").fetchone()[0] - keep
            if over > 0:
                self.db.execute("delete from update_reports where id in (select id from "
                                "update_reports order by id limit ?)", [over])
                self.db.execute("insert into update_reports_dropped (id, count) values "
                                "(1, ?) on conflict(id) do update set count = count + ?",
                                [over, over])
        return max(over, 0)

    def dropped_reports(self) -> int:
        """Reports dropped from a full queue and not yet told to the fleet."""
        row = self.db.execute("select count from update_reports_dropped where id = 1"
                              ).fetchone()
        return row[0] if row else 0

    def forget_dropped(self, told: int) -> None:
        with self.db.conn:
            self.db.execute("update update_reports_dropped set count = count - ? where "
                            "id = 1", [told])

    def queued_reports(self, limit: int = 500) -> list[tuple[int, dict]]:
        return [(r["id"], json.loads(r["body"])) for r in self.db.query(
            "select * from update_reports order by id limit ?", [limit])]

    def drop_reports(self, ids: list[int]) -> None:
        with self.db.conn:
            self.db.execute(f"delete from update_reports where id in "
                            f"({','.join('?' * len(ids))})", ids)
