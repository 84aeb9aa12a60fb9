"""Who gets which version: pure functions of the metadata, the device id and its labels.

The fleet fraction is normative (DESIGN section 5) so that any implementation agrees::

    u = int.from_bytes(sha256(f"{rollout_id}:{device_id}".encode()).digest()[:8], "big") / 2**64
    in_cohort = selector matches device labels and u < fraction

Nothing here does I/O; the agent and the fleet server both call it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from updater.activation import ActivationPolicy
from updater.plans import Plan
from updater.shadow import ShadowPolicy

ROLLOUT_STATES = ("active", "paused", "halted")


def cohort_point(rollout_id: str, device_id: str) -> float:
    """The device's point u in [0, 1) for this rollout."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every selector key must be a label of the device with exactly that value."""
    return all(labels.get(k) == v for k, v in selector.items())


def in_cohort(rollout_id: str, fraction: float, selector: Mapping[str, str],
              device_id: str, labels: Mapping[str, str]) -> bool:
    return selector_matches(selector, labels) and cohort_point(rollout_id, device_id) < fraction


@dataclass(frozen=True)
class Rollout:
    id: str
    fraction: float
    selector: dict[str, str] = field(default_factory=dict)
    state: str = "active"  # active | paused | halted
    failure_threshold: float = 0.1
    min_reports: int = 5
    shadow: ShadowPolicy | None = None  # a shadow phase before a device answers with it
    plan: Plan | None = None  # stages the fleet server advances by itself (plans.py)
    # (fraction, unix time it was signed) of every fraction the rollout had: which stage
    # brought a device in, and since when (fleet-side only: devices read the fraction)
    history: tuple[tuple[float, float], ...] = ()

    def as_custom(self) -> dict:
        """As TUF target ``custom`` data. Canonical JSON has no floats: those are strings."""
        out = {"id": self.id, "fraction": repr(float(self.fraction)),
               "selector": dict(self.selector), "state": self.state,
               "failure_threshold": repr(float(self.failure_threshold)),
               "min_reports": self.min_reports}
        if self.shadow is not None:
            out["shadow"] = self.shadow.as_custom()
        if self.plan is not None:
            out["plan"] = self.plan.as_custom()
        if self.history:
            out["history"] = [[repr(float(f)), repr(float(t))] for f, t in self.history]
        return out

    @classmethod
    def from_custom(cls, data: Mapping) -> Rollout:
        return cls(id=str(data["id"]), fraction=float(data["fraction"]),
                   selector={str(k): str(v) for k, v in dict(data.get("selector", {})).items()},
                   state=str(data.get("state", "active")),
                   failure_threshold=float(data.get("failure_threshold", 0.1)),
                   min_reports=int(data.get("min_reports", 5)),
                   shadow=(ShadowPolicy.from_custom(data["shadow"])
                           if data.get("shadow") is not None else None),
                   plan=Plan.from_custom(data["plan"]) if data.get("plan") else None,
                   history=tuple((float(f), float(t)) for f, t in data.get("history", ())))

    def includes(self, device_id: str, labels: Mapping[str, str]) -> bool:
        return in_cohort(self.id, self.fraction, self.selector, device_id, labels)

    @property
    def stage_lower(self) -> float:
        """The fraction before the current one: devices at or above it joined last."""
        return self.history[-2][0] if len(self.history) >= 2 else 0.0

    @property
    def stage_started(self) -> float | None:
        return self.history[-1][1] if self.history else None

    def joined_at(self, point: float) -> float | None:
        """When the fraction first covered cohort point ``point`` (None: unknown)."""
        return next((t for f, t in self.history if point < f), None)


@dataclass(frozen=True)
class Release:
    """One release target as the metadata describes it (the rollout may be absent)."""

    model: str
    version: int
    target_path: str
    rollout: Rollout | None
    activation: ActivationPolicy | None = None  # None: activated once validated


def desired_version(releases: Iterable[Release], model: str, device_id: str,
                    labels: Mapping[str, str], *, bad: Iterable[int] = (),
                    current: int | None = None) -> Release | None:
    """The release of ``model`` this device should run, or None when none qualifies.

    The highest version whose rollout includes the device, is not halted, is not paused
    for a new install (a device already on a paused version keeps it), and is not marked
    bad locally. A device on a halted version therefore falls back to the highest one
    that still qualifies.
    """
    bad_set = set(bad)
    best: Release | None = None
    for rel in releases:
        r = rel.rollout
        if rel.model != model or r is None or rel.version in bad_set:
            continue
        if r.state == "halted" or (r.state == "paused" and rel.version != current):
            continue
        if not r.includes(device_id, labels):
            continue
        if best is None or rel.version > best.version:
            best = rel
    return best


FINAL_STATES = ("committed", "failed", "rolled_back", "rejected_in_shadow")


def failure_share(states: Iterable[str]) -> tuple[int, float]:
    """Among final reports (committed, failed, rolled_back, rejected_in_shadow): how many,
    and the share that are not committed (a rejection in shadow is a failure)."""
    final = [s for s in states if s in FINAL_STATES]
    if not final:
        return 0, 0.0
    failed = sum(1 for s in final if s != "committed")
    return len(final), failed / len(final)


def should_halt(rollout: Rollout, states: Iterable[str]) -> bool:
    """The fleet's auto-halt rule: enough final reports, and too many of them failures."""
    n, share = failure_share(states)
    return rollout.state != "halted" and n >= rollout.min_reports and \
        share > rollout.failure_threshold
