"""A rollout's figures kept up to date report by report, so a report costs the same with
10 devices or 10,000: no scan of the fleet's states per report.

One ``RolloutTally`` a live rollout holds every device the fleet knows (its cohort point,
whether its labels match the selector, its latest state on this rollout) and counts, for
the devices inside the cohort and for those the current stage added, how many are in
each state. A report moves one device between counts; a new fraction or selector (a
stage advanced, a promote) recounts once. Nothing here does I/O.

Beside the halt's figures, what the fleet shows of how the release travelled (``view``),
over every device that reported on the rollout: the bytes its devices downloaded as
deltas and as full files (each device's latest download, from its ``downloaded``
report), the devices waiting for an activation window or for their app (their latest
state), and the devices whose engine came prebuilt or was built there (``validated``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from updater.cohort import FINAL_STATES, Rollout, cohort_point, selector_matches
from updater.plans import StageFigures

KNOWN = "(known)"  # a device the fleet knows that has not reported on this rollout
DOWNLOAD_KINDS = ("delta", "full")  # a 'downloaded' report's download.kind
ENGINE_KINDS = ("prebuilt", "built")  # a 'validated' report's engine
WAITING = {"window": "waiting_window", "app": "waiting_app"}  # what a ready update waits for


class RolloutTally:
    def __init__(self, rollout: Rollout):
        self.rollout = rollout
        self.points: dict[str, float] = {}
        self.matches: dict[str, bool] = {}
        self.labels: dict[str, Mapping[str, str]] = {}
        self.states: dict[str, str] = {}
        self.times: dict[str, float] = {}  # device time of each device's latest state
        self.cohort: Counter = Counter()  # state -> devices inside the cohort
        self.stage: Counter = Counter()  # state -> devices the current stage added
        self.reported: Counter = Counter()  # state -> devices that reported, in it or not
        self.downloads: dict[str, tuple[str, int, int]] = {}  # device -> (kind, bytes,
        # the full release's bytes) of its latest download
        self.engines: dict[str, str] = {}  # device -> prebuilt | built
        self.delivery: Counter = Counter()  # kind -> bytes, kind + "_devices" -> devices,
        # "release" -> what the same devices would have downloaded as full files
        self.engine_counts: Counter = Counter()

    def _where(self, device_id: str) -> tuple[bool, bool]:
        """(inside the cohort, added by the current stage)."""
        r = self.rollout
        u = self.points[device_id]
        inside = self.matches[device_id] and u < r.fraction
        return inside, inside and u >= r.stage_lower

    def _count(self, device_id: str, sign: int) -> None:
        inside, in_stage = self._where(device_id)
        state = self.states[device_id]
        if inside:
            self.cohort[state] += sign
        if in_stage:
            self.stage[state] += sign

    def see(self, device_id: str, labels: Mapping[str, str], state: str | None = None,
            ts: float = 0.0, download: Mapping | None = None, engine: str | None = None,
            ) -> None:
        """A device the fleet knows, with its labels, and its state on this rollout at
        device time ``ts`` (an older report than the one counted changes nothing, as in
        the store), with the report's download and engine, if it has them."""
        if device_id in self.points:
            self._count(device_id, -1)
        else:
            self.points[device_id] = cohort_point(self.rollout.id, device_id)
            self.states[device_id] = KNOWN
        self.labels[device_id] = labels
        self.matches[device_id] = selector_matches(self.rollout.selector, labels)
        if state is not None and ts >= self.times.get(device_id, float("-inf")):
            old = self.states[device_id]
            if old != KNOWN:
                self.reported[old] -= 1
            self.reported[state] += 1
            self.states[device_id] = state
            self.times[device_id] = ts
            if download is not None:
                self._download(device_id, (download["kind"], download["bytes"],
                                           download["full_bytes"]))
            if engine is not None:
                if device_id in self.engines:
                    self.engine_counts[self.engines[device_id]] -= 1
                self.engines[device_id] = engine
                self.engine_counts[engine] += 1
        self._count(device_id, +1)

    def _download(self, device_id: str, got: tuple[str, int, int]) -> None:
        """A device's latest download replaces its earlier one in the counts."""
        before = self.downloads.get(device_id)
        for (kind, n, full), sign in ((before, -1), (got, +1)) if before else ((got, +1),):
            self.delivery[kind] += sign * n
            self.delivery[f"{kind}_devices"] += sign
            self.delivery["release"] += sign * full
        self.downloads[device_id] = got

    def view(self) -> dict:
        """Bytes sent as deltas and as full files (and what full files alone would have
        taken), devices waiting for a window or their app, engines prebuilt or built."""
        return fleet_view(self.delivery, self.reported, self.engine_counts)

    def rebase(self, rollout: Rollout) -> None:
        """The rollout was re-signed: recount if who is in it, or in its stage, changed."""
        old, self.rollout = self.rollout, rollout
        if (old.fraction, old.stage_lower, old.selector) != \
                (rollout.fraction, rollout.stage_lower, rollout.selector):
            self.cohort.clear()
            self.stage.clear()
            for device_id, labels in self.labels.items():
                self.matches[device_id] = selector_matches(rollout.selector, labels)
                self._count(device_id, +1)

    def figures(self) -> StageFigures:
        final = sum(self.cohort[s] for s in FINAL_STATES)
        stage_final = sum(self.stage[s] for s in FINAL_STATES)
        return StageFigures(
            known=sum(self.cohort.values()), committed=self.cohort["committed"],
            final=final, failed=final - self.cohort["committed"], stage_final=stage_final,
            stage_failed=stage_final - self.stage["committed"])

    def point(self, device_id: str) -> float:
        if device_id not in self.points:
            return cohort_point(self.rollout.id, device_id)
        return self.points[device_id]


def fleet_view(delivery: Counter, reported: Counter, engines: Counter) -> dict:
    """``RolloutTally.view`` of these counts (all zero: a release not rolled out)."""
    sent = sum(delivery[k] for k in DOWNLOAD_KINDS)
    return {"downloads": {**{k: {"devices": delivery[f"{k}_devices"], "bytes": delivery[k]}
                             for k in DOWNLOAD_KINDS},
                          "bytes": sent, "full_release_bytes": delivery["release"],
                          "saved_bytes": delivery["release"] - sent},
            "waiting": {k: reported[s] for k, s in WAITING.items()},
            "engines": {k: engines[k] for k in ENGINE_KINDS}}


def tally_from_db(rollout: Rollout, known: Mapping[str, Mapping[str, str]], db) -> RolloutTally:
    """A rollout's tally from what fleet.db holds (at start, or for `fleet status`)."""
    tally = RolloutTally(rollout)
    for device_id, labels in known.items():
        tally.see(device_id, labels)
    for device_id, state, ts, download, engine in db.latest(rollout.id):
        tally.see(device_id, known.get(device_id, {}), state, ts, download, engine)
    return tally
