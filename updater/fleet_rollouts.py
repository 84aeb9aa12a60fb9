"""The fleet server's picture of its live rollouts, kept in memory between reports.

The releases are read from the signed targets metadata only when that file changes (a
CLI command or the server itself re-signed it), not once a report; each live rollout's
figures are a ``RolloutTally`` moved by each report. From them: whether a report is one
to count at all, whether a rollout must halt, and whether a planned rollout's stage may
advance (plans.py decides; the server signs).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from updater.cohort import Release
from updater.fleet_db import FleetStore
from updater.fleet_repo import FleetRepo
from updater.plans import Advance, StageFigures, advance_decision, halt_reason
from updater.report_auth import MAX_SKEW_S
from updater.rollout_tally import RolloutTally, tally_from_db


@dataclass(frozen=True)
class Decision:
    release: Release
    why: str
    figures: StageFigures


class LiveRollouts:
    def __init__(self, repo: FleetRepo, db: FleetStore):
        self.repo = repo
        self.db = db
        self.known: dict[str, dict] = db.known_devices()  # device id -> labels
        self.releases: list[Release] = []
        self.by_id: dict[str, Release] = {}
        self.tallies: dict[str, RolloutTally] = {}
        self._seen_ids: set[str] = set()  # rollout ids fleet.db holds reports of
        self._targets_stamp: tuple | None = None
        self.refresh()

    def refresh(self, force: bool = False) -> None:
        """Re-read the releases if targets.json was re-signed (a new file each time), or
        with ``force`` (another replica signed: shared storage may cache the old stat)."""
        st = os.stat(self.repo.metadata_dir / "targets.json")
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._targets_stamp and not force:
            return
        self._targets_stamp = stamp
        self.releases = self.repo.releases()
        self.by_id = {r.rollout.id: r for r in self.releases if r.rollout is not None}
        for rollout_id in list(self.tallies):
            if rollout_id not in self.by_id:
                del self.tallies[rollout_id]
        for rollout_id, release in self.by_id.items():
            tally = self.tallies.get(rollout_id)
            if tally is None:
                self.tallies[rollout_id] = tally_from_db(release.rollout, self.known, self.db)
            else:
                tally.rebase(release.rollout)

    def refusal(self, r: dict, i: int, now: float) -> str | None:
        """Why report ``i`` is not one to count (stored nowhere), or None."""
        rollout_id = r["rollout_id"]
        if r["ts"] > now + MAX_SKEW_S:
            return (f"reports[{i}] is dated {r['ts'] - now:.0f}s ahead of the fleet "
                    f"server's clock (at most {MAX_SKEW_S:.0f}s): set the device's clock")
        release = self.by_id.get(rollout_id)
        if release is None:
            if rollout_id in self._seen_ids or self.db.has_rollout(rollout_id):
                self._seen_ids.add(rollout_id)
                return None  # a rollout since replaced: kept as history
            return (f"reports[{i}]: this fleet has no rollout {rollout_id!r} (not in the "
                    f"signed metadata, never reported on)")
        rollout = release.rollout
        joined = rollout.joined_at(self.tallies[rollout_id].point(r["device_id"]))
        if joined is not None and r["ts"] < joined - MAX_SKEW_S:
            return (f"reports[{i}] is dated {joined - r['ts']:.0f}s before rollout "
                    f"{rollout_id}'s stage took device {r['device_id']!r} in: a report "
                    f"for a stage long past")
        return None

    def take(self, reports: list[dict]) -> None:
        """Move the tallies by reports fleet.db has just stored."""
        for r in reports:
            device_id, labels = r["device_id"], r["labels"]
            if self.known.get(device_id) != labels:
                self.known[device_id] = labels
                for tally in self.tallies.values():
                    tally.see(device_id, labels)
            tally = self.tallies.get(r["rollout_id"])
            if tally is not None:
                tally.see(device_id, labels, r["state"], r["ts"], r.get("download"),
                          r.get("engine"))

    def to_halt(self, rollout_ids: set[str]) -> list[Decision]:
        out = []
        for rollout_id in rollout_ids:
            release = self.by_id.get(rollout_id)
            if release is None or release.rollout.state == "halted":
                continue
            fig = self.tallies[rollout_id].figures()
            why = halt_reason(release.rollout.failure_threshold, release.rollout.min_reports,
                              fig)
            if why is not None:
                out.append(Decision(release, why, fig))
        return out

    def plan_word(self, release: Release, now: float) -> Advance:
        """What the planner says of a planned rollout's stage now (acts on nothing)."""
        rollout = release.rollout
        fig = self.tallies[rollout.id].figures()
        progress = self.db.progress(rollout.id)
        met_since = progress[1] if progress and progress[0] == rollout.fraction else None
        shadow = None
        if rollout.shadow is not None:
            summary = self.db.shadow_summary(rollout.id)
            shadow = (summary["disagreement"], rollout.shadow.max_disagreement)
        return advance_decision(rollout.plan, rollout.fraction, fig, shadow, met_since, now)

    def planned(self) -> list[Release]:
        return [r for r in self.releases if r.rollout is not None
                and r.rollout.plan is not None and r.rollout.state == "active"]


def plan_status(release: Release, live: LiveRollouts, now: float | None = None) -> dict:
    """A planned rollout's stage, what it waits for and when it may advance."""
    rollout, plan = release.rollout, release.rollout.plan
    now = time.time() if now is None else now
    word = live.plan_word(release, now)
    if rollout.state != "active":
        waits = f"the rollout is {rollout.state}: the plan does not advance"
    else:
        waits = word.why
    return {"stage": plan.stage_number(rollout.fraction), "stages": len(plan.stages),
            "fraction": rollout.fraction, "next": plan.next_fraction(rollout.fraction),
            "stage_started": rollout.stage_started, "waits_for": waits,
            "met_since": word.met_since,
            "may_advance_at": word.may_advance_at if rollout.state == "active" else None,
            "figures": live.tallies[rollout.id].figures().__dict__}
