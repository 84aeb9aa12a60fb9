"""A rollout's figures kept up to date report by report, so a report costs the same with
10 devices or 10,000: no scan of the fleet's states per report.

One ``RolloutTally`` a live rollout holds every device the fleet knows (its cohort point,
whether its labels match the selector, its latest state on this rollout) and counts, for
the devices inside the cohort and for those the current stage added, how many are in
each state. A report moves one device between counts; a new fraction or selector (a
stage advanced, a promote) recounts once. Nothing here does I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from updater.cohort import FINAL_STATES, Rollout, cohort_point, selector_matches
from updater.plans import StageFigures

KNOWN = "(known)"  # a device the fleet knows that has not reported on this rollout


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
            ts: float = 0.0) -> None:
        """A device the fleet knows, with its labels, and its state on this rollout at
        device time ``ts`` (an older report than the one counted changes nothing)."""
        if device_id in self.points:
            self._count(device_id, -1)
        else:
            self.points[device_id] = cohort_point(self.rollout.id, device_id)
            self.states[device_id] = KNOWN
        self.labels[device_id] = labels
        self.matches[device_id] = selector_matches(self.rollout.selector, labels)
        if state is not None and ts >= self.times.get(device_id, float("-inf")):
            self.states[device_id] = state
            self.times[device_id] = ts
        self._count(device_id, +1)

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


def tally_from_db(rollout: Rollout, known: Mapping[str, Mapping[str, str]], db) -> RolloutTally:
    """A rollout's tally from what fleet.db holds (at start, or for `fleet status`)."""
    tally = RolloutTally(rollout)
    for device_id, labels in known.items():
        tally.see(device_id, labels)
    for device_id, state, ts in db.latest(rollout.id):
        tally.see(device_id, known.get(device_id, {}), state, ts)
    return tally
