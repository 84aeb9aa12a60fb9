"""Shadow-verified releases: the limits a rollout signs, and the verdict on the figures.

A rollout may carry a shadow phase: a device that took the release and validated it on
its samples runs it as a shadow of the active version on its own live traffic (the
active version answers; the candidate sees copies) before it may answer with it. The
policy is plain data checked in one place (``ShadowPolicy.check``), signed in the
rollout's ``custom`` metadata; ``shadow_verdict`` is a pure function of the figures the
serving process measured and the policy. Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

MAX_WINDOW_S = 7 * 86400.0
MAX_MIN_REQUESTS = 10_000_000
MAX_LATENCY_RATIO = 1000.0
# Latencies below this are not held against a candidate: a ratio of two sub-millisecond
# figures is noise (a 0.1 ms model against a 0.2 ms one is not "twice as slow" in use).
LATENCY_FLOOR_MS = 1.0
P99_MIN_REQUESTS = 100  # p99 is judged only over at least this many compared requests

DEFAULTS = {"min_requests": 100, "max_disagreement": 0.01, "max_latency_ratio": 2.0,
            "sample": 1.0}


class ShadowPolicyError(ValueError):
    """A shadow limit out of range; ``str()`` names the limit, its range and the value."""


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'10m', '30s', '1.5h', '250ms' or plain seconds, as seconds."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise ShadowPolicyError(f"{text!r} is not a duration; write e.g. 30s, 10m, 1h")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True)
class ShadowPolicy:
    window_s: float  # the candidate shadows live traffic at least this long
    min_requests: int = DEFAULTS["min_requests"]  # and compares at least this many
    max_disagreement: float = DEFAULTS["max_disagreement"]  # share of requests, 0..1
    max_latency_ratio: float = DEFAULTS["max_latency_ratio"]  # p50 and p99 vs the active
    sample: float = DEFAULTS["sample"]  # share of live requests copied to the shadow

    def check(self) -> None:
        """Raise ShadowPolicyError for the first limit out of range."""
        def bad(name: str, rng: str, value) -> ShadowPolicyError:
            return ShadowPolicyError(f"shadow {name} {value!r} must be {rng}")

        if not (isinstance(self.window_s, (int, float)) and math.isfinite(self.window_s)
                and 0 < self.window_s <= MAX_WINDOW_S):
            raise bad("window", f"a duration above 0 and at most {MAX_WINDOW_S:.0f}s "
                                f"(7 days)", self.window_s)
        if type(self.min_requests) is not int or not 1 <= self.min_requests <= MAX_MIN_REQUESTS:
            raise bad("min_requests", f"an integer in 1..{MAX_MIN_REQUESTS}", self.min_requests)
        if not (_finite(self.max_disagreement) and 0.0 <= self.max_disagreement <= 1.0):
            raise bad("max_disagreement", "a share in 0..1 (0.02 means 2%)",
                      self.max_disagreement)
        if not (_finite(self.max_latency_ratio)
                and 1.0 <= self.max_latency_ratio <= MAX_LATENCY_RATIO):
            raise bad("max_latency_ratio", f"in 1..{MAX_LATENCY_RATIO:g} (1.5: the candidate"
                                           f" may be 50% slower)", self.max_latency_ratio)
        if not (_finite(self.sample) and 0.0 < self.sample <= 1.0):
            raise bad("sample", "a share in (0, 1] of live requests to copy", self.sample)

    def as_custom(self) -> dict:
        """As rollout ``custom`` data (TUF's canonical JSON has no floats: strings)."""
        return {"window_s": repr(float(self.window_s)), "min_requests": self.min_requests,
                "max_disagreement": repr(float(self.max_disagreement)),
                "max_latency_ratio": repr(float(self.max_latency_ratio)),
                "sample": repr(float(self.sample))}

    @classmethod
    def from_custom(cls, data: object) -> ShadowPolicy:
        """Read and check signed metadata; ShadowPolicyError says what is wrong."""
        if not isinstance(data, Mapping):
            raise ShadowPolicyError(f"shadow must be a map of limits, got {data!r}")
        unknown = set(data) - {"window_s", "min_requests", "max_disagreement",
                               "max_latency_ratio", "sample"}
        if unknown:
            raise ShadowPolicyError(f"shadow has unknown limit '{sorted(unknown)[0]}'")
        try:
            policy = cls(window_s=float(data["window_s"]),
                         min_requests=_int(data.get("min_requests", DEFAULTS["min_requests"])),
                         max_disagreement=float(data.get("max_disagreement",
                                                         DEFAULTS["max_disagreement"])),
                         max_latency_ratio=float(data.get("max_latency_ratio",
                                                          DEFAULTS["max_latency_ratio"])),
                         sample=float(data.get("sample", DEFAULTS["sample"])))
        except KeyError as exc:
            raise ShadowPolicyError("shadow needs window_s") from exc
        except (TypeError, ValueError) as exc:
            raise ShadowPolicyError(f"shadow limits must be numbers: {exc}") from exc
        policy.check()
        return policy

    def describe(self) -> str:
        return (f"shadow {self.window_s:g}s, >= {self.min_requests} requests, "
                f"disagreement <= {self.max_disagreement:g}, latency <= "
                f"{self.max_latency_ratio:g}x, sample {self.sample:g}")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise ValueError(f"min_requests {x!r} is not an integer")
    return int(x)


@dataclass(frozen=True)
class ShadowFigures:
    """What one device measured of a candidate shadowing its active version."""

    elapsed_s: float = 0.0
    requests: int = 0  # live requests whose copy was answered and compared
    agreed: int = 0  # of those, answered alike (top-1 or within tolerance)
    errors: int = 0  # copies the candidate failed (or answered with other outputs)
    error_codes: dict | None = None
    shed: int = 0  # copies not sent because live traffic needed the device
    p50_ms: float = 0.0  # the candidate's latency on the copies
    p99_ms: float = 0.0
    live_p50_ms: float = 0.0  # the active version's on the same requests
    live_p99_ms: float = 0.0

    @property
    def judged(self) -> int:
        return self.requests + self.errors

    @property
    def disagreement(self) -> float:
        """Share of judged requests the candidate answered otherwise, or not at all."""
        return (self.requests - self.agreed + self.errors) / self.judged if self.judged \
            else 0.0

    def as_report(self) -> dict:
        out = asdict(self)
        out["error_codes"] = dict(self.error_codes or {})
        out["disagreement"] = round(self.disagreement, 6)
        return out

    def describe(self) -> str:
        codes = ", ".join(f"{k} {v}" for k, v in sorted((self.error_codes or {}).items()))
        return (f"{self.requests} requests compared in {self.elapsed_s:.1f}s, disagreement "
                f"{self.disagreement:.1%}, {self.errors} errors" + (f" ({codes})" if codes
                                                                    else "")
                + f", p50 {self.p50_ms:.2f} ms / p99 {self.p99_ms:.2f} ms against the "
                f"active version's {self.live_p50_ms:.2f} / {self.live_p99_ms:.2f} ms, "
                f"{self.shed} copies shed")


def figures_from_snapshot(snap: Mapping | None, elapsed_s: float) -> ShadowFigures:
    """The router's shadow snapshot (serving/router.py ShadowStats) as figures."""
    if not snap:
        return ShadowFigures(elapsed_s=elapsed_s)
    lat, live = snap.get("latency_ms") or {}, snap.get("live_latency_ms") or {}
    errors = {str(k): int(v) for k, v in (snap.get("errors") or {}).items()}
    return ShadowFigures(
        elapsed_s=elapsed_s, requests=int(snap.get("compared", 0)),
        agreed=int(snap.get("agreed", 0)), errors=sum(errors.values()), error_codes=errors,
        shed=int(snap.get("shed", 0)), p50_ms=float(lat.get("p50", 0.0)),
        p99_ms=float(lat.get("p99", 0.0)), live_p50_ms=float(live.get("p50", 0.0)),
        live_p99_ms=float(live.get("p99", 0.0)))


PASS, REJECT, WAIT = "pass", "reject", "wait"


def shadow_verdict(fig: ShadowFigures, policy: ShadowPolicy) -> tuple[str, str]:
    """(PASS | REJECT | WAIT, why). WAIT until the window has passed and enough requests
    were judged; then the disagreement (errors count as disagreeing) and the latency
    ratios decide. There is no timeout to PASS: without evidence no candidate answers."""
    if fig.elapsed_s < policy.window_s or fig.judged < policy.min_requests:
        return WAIT, (f"{fig.judged} of {policy.min_requests} requests after "
                      f"{fig.elapsed_s:.0f}s of {policy.window_s:g}s")
    if fig.disagreement > policy.max_disagreement:
        return REJECT, (f"disagreement {fig.disagreement:.1%} over {fig.judged} requests, "
                        f"above the limit {policy.max_disagreement:.1%}")
    for name, new, old in (("p50", fig.p50_ms, fig.live_p50_ms),
                           ("p99", fig.p99_ms, fig.live_p99_ms)):
        if name == "p99" and fig.requests < P99_MIN_REQUESTS:
            continue  # the 99th percentile of a few requests is their slowest one
        if new > LATENCY_FLOOR_MS and new > policy.max_latency_ratio * max(old,
                                                                           LATENCY_FLOOR_MS):
            return REJECT, (f"{name} latency {new:.2f} ms against {old:.2f} ms for the "
                            f"active version, above {policy.max_latency_ratio:g}x")
    return PASS, (f"agreed on {fig.agreed} of {fig.judged} requests "
                  f"(disagreement {fig.disagreement:.1%})")
