"""Rollout plans: stages the fleet server advances by itself, and when it halts one.

A plan is signed with its rollout (``custom["plan"]``): the stage fractions (rising, the
last 1.0), how long a stage must hold its figures (``soak_s``) and the share of the
stage's cohort that must have committed (``min_committed``). Devices read only the
rollout's fraction, and the cohort formula is unchanged, so each stage keeps the devices
of the last. The decisions here are pure functions of a stage's figures and a clock;
the fleet server gathers the figures (updater/rollout_tally.py) and re-signs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from updater.shadow import ShadowPolicyError, parse_duration

MAX_STAGES = 20
MAX_SOAK_S = 30 * 86400.0


class PlanError(ValueError):
    """A plan, soak or share out of range; ``str()`` says which, where and what to write."""


def parse_stages(text: str) -> tuple[float, ...]:
    """'1,5,25,100' (percent of the fleet) as fractions (0.01, 0.05, 0.25, 1.0)."""
    try:
        percents = [float(p) for p in text.split(",")]
    except ValueError as exc:
        raise PlanError(f"--plan {text!r} must be percentages separated by commas, e.g. "
                        f"1,5,25,100") from exc
    return tuple(p / 100 for p in percents)


def parse_soak(text: str) -> float:
    try:
        return parse_duration(text)
    except ShadowPolicyError as exc:
        raise PlanError(f"--soak {text!r} is not a duration; write e.g. 30s, 30m, 2h") from exc


@dataclass(frozen=True)
class Plan:
    stages: tuple[float, ...]  # fractions of the fleet, rising, the last 1.0
    soak_s: float  # a stage holds its figures this long before it advances
    min_committed: float = 0.95  # share of the stage's known cohort that committed

    def check(self) -> None:
        """Raise PlanError for the first thing out of range."""
        s = self.stages
        pct = ",".join(f"{f * 100:g}" for f in s)
        if not s or len(s) > MAX_STAGES:
            raise PlanError(f"--plan {pct!r} needs 1..{MAX_STAGES} stages, e.g. 1,5,25,100")
        bad = next((f for f in s if not (math.isfinite(f) and 0.0 < f <= 1.0)), None)
        if bad is not None:
            raise PlanError(f"--plan {pct!r}: stage {bad * 100:g}% is outside (0, 100]; "
                            f"each stage is a percentage of the fleet above 0, at most 100")
        if any(b <= a for a, b in zip(s, s[1:], strict=False)):
            raise PlanError(f"--plan {pct!r} does not rise; each stage must be above the "
                            f"last, e.g. 1,5,25,100")
        if s[-1] != 1.0:
            raise PlanError(f"--plan {pct!r} ends at {s[-1] * 100:g}%; the last stage "
                            f"must be 100 (a plan rolls out to the whole cohort)")
        if not (math.isfinite(self.soak_s) and 0.0 <= self.soak_s <= MAX_SOAK_S):
            raise PlanError(f"--soak {self.soak_s!r}s must be 0..{MAX_SOAK_S:.0f}s (30 days)")
        if not (math.isfinite(self.min_committed) and 0.0 < self.min_committed <= 1.0):
            raise PlanError(f"--min-committed {self.min_committed!r} must be a share in "
                            f"(0, 1] (0.95 means 95% of the stage's devices)")

    def as_custom(self) -> dict:
        """As rollout ``custom`` data (TUF's canonical JSON has no floats: strings)."""
        return {"stages": [repr(float(f)) for f in self.stages],
                "soak_s": repr(float(self.soak_s)),
                "min_committed": repr(float(self.min_committed))}

    @classmethod
    def from_custom(cls, data: object) -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise PlanError(f"plan must be a map with a list of stages, got {data!r}")
        try:
            plan = cls(tuple(float(f) for f in data["stages"]), float(data["soak_s"]),
                       float(data.get("min_committed", 0.95)))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan limits must be numbers: {exc}") from exc
        plan.check()
        return plan

    def next_fraction(self, fraction: float) -> float | None:
        """The stage after ``fraction`` (a hand promote may sit between stages)."""
        return next((f for f in self.stages if f > fraction + 1e-12), None)

    def stage_number(self, fraction: float) -> int:
        """1-based: how many stages ``fraction`` has reached."""
        return sum(f <= fraction + 1e-12 for f in self.stages)

    def describe(self) -> str:
        return (f"plan {','.join(f'{f * 100:g}' for f in self.stages)}%, soak "
                f"{self.soak_s:g}s, >= {self.min_committed:.0%} committed")


@dataclass(frozen=True)
class StageFigures:
    """What the fleet knows of a rollout's current stage (rollout_tally.py)."""

    known: int  # devices the fleet knows in the stage's cohort (fraction and selector)
    committed: int  # of them, committed
    final: int  # cohort devices in a final state
    failed: int  # of them, not committed
    stage_final: int  # the same over the devices that entered at this stage
    stage_failed: int


def halt_reason(failure_threshold: float, min_reports: int, fig: StageFigures) -> str | None:
    """Why to halt, or None. The whole cohort, and the devices the current stage added:
    each judged once it has ``min_reports`` executed (final) devices."""
    for what, final, failed in (("cohort devices", fig.final, fig.failed),
                                ("devices of this stage", fig.stage_final, fig.stage_failed)):
        if final >= min_reports and failed / final > failure_threshold:
            return (f"{failed} of {final} reporting {what} failed "
                    f"(threshold {failure_threshold}, at least {min_reports} executed)")
    return None


@dataclass(frozen=True)
class Advance:
    """The planner's word on one stage: advance now, or what it waits for and until when."""

    advance: bool
    why: str
    met_since: float | None  # when the stage first met its figures (the soak started)
    may_advance_at: float | None  # the earliest it may advance, if the figures hold


def advance_decision(plan: Plan, fraction: float, fig: StageFigures,
                     shadow: tuple[float, float] | None, met_since: float | None,
                     now: float) -> Advance:
    """Advance once the stage's known cohort has committed ``min_committed`` and (with a
    shadow policy: ``shadow`` = (aggregated disagreement, its limit)) agreed within the
    limit, and has held that for ``soak_s``. The failure threshold is the halt's."""
    nxt = plan.next_fraction(fraction)
    if nxt is None:
        return Advance(False, "the last stage: nothing to advance to", met_since, None)
    need = max(1, math.ceil(plan.min_committed * fig.known - 1e-9))
    if fig.committed < need:
        return Advance(False, f"waits for commits: {fig.committed} of {fig.known} known "
                              f"cohort devices committed, {need} needed "
                              f"({plan.min_committed:.0%})", None, None)
    if shadow is not None and shadow[0] > shadow[1]:
        return Advance(False, f"waits for shadow agreement: disagreement {shadow[0]:.2%} "
                              f"over the cohort, limit {shadow[1]:.2%}", None, None)
    since = now if met_since is None else met_since
    at = since + plan.soak_s
    if now < at:
        return Advance(False, f"soaking: {fig.committed} of {fig.known} committed; may "
                              f"advance to {nxt:.0%} after {plan.soak_s:g}s of soak",
                       since, at)
    return Advance(True, f"{fig.committed} of {fig.known} known cohort devices committed "
                         f"(>= {plan.min_committed:.0%}), {fig.failed} of {fig.final} "
                         f"failed, held {now - since:.0f}s (soak {plan.soak_s:g}s)"
                   + (f", shadow disagreement {shadow[0]:.2%} <= {shadow[1]:.2%}"
                      if shadow is not None else ""), since, at)
