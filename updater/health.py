"""The health watch's verdict: a pure function of two versions' figures and the limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    """Cumulative request figures of one served version."""

    success: int
    failure: int
    p50_ms: float

    @property
    def total(self) -> int:
        return self.success + self.failure

    @property
    def error_rate(self) -> float:
        return self.failure / self.total if self.total else 0.0


def window(start: Health, end: Health) -> Health:
    """What happened between two readings (latency: the later reading's p50)."""
    return Health(end.success - start.success, end.failure - start.failure, end.p50_ms)


def verdict(new: Health, base: Health | None, *, max_error_rate_increase: float,
            max_latency_ratio: float, min_requests: int) -> str | None:
    """None when the new version may be committed, else why it must be rolled back.

    Errors are judged on any traffic; latency only with at least ``min_requests`` in the
    window and a previous version that had a latency to compare with. No traffic at all
    passes: there is nothing to hold against the new version.
    """
    base_rate = base.error_rate if base else 0.0
    if new.total and new.error_rate > base_rate + max_error_rate_increase:
        return (f"error rate {new.error_rate:.1%} over {new.total} requests against "
                f"{base_rate:.1%} for the previous version")
    if base and base.p50_ms > 0 and new.total >= min_requests and \
            new.p50_ms > max_latency_ratio * base.p50_ms:
        return (f"p50 latency {new.p50_ms:.2f} ms against {base.p50_ms:.2f} ms for the "
                f"previous version")
    return None
