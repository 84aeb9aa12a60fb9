"""Per model-version figures: requests, failures, batches and latencies.

Updated on the event loop only (no locks); read by the `stats` op and by /metrics
(appliance/metrics.py), which therefore report the same figures. Latency percentiles come
from a ring of the most recent requests, and durations are counted into fixed histogram
buckets, so memory stays fixed.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

RECENT = 4096
# Upper bounds (seconds, "less or equal") of the duration histograms; one more bucket: +Inf.
DURATION_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class VersionStats:
    __slots__ = (
        "request_success", "request_failure", "failures_by_code", "inference_count",
        "execution_count", "request_s_total", "queue_s_total", "compute_s_total",
        "_recent", "_recent_n", "request_hist", "queue_hist", "compute_hist",
    )

    def __init__(self) -> None:
        self.request_success = 0
        self.request_failure = 0
        self.failures_by_code: dict[str, int] = {}
        self.inference_count = 0  # rows run (a batch of 8 counts 8)
        self.execution_count = 0  # engine calls
        self.request_s_total = 0.0
        self.queue_s_total = 0.0
        self.compute_s_total = 0.0
        self._recent = np.zeros(RECENT, dtype=np.float64)
        self._recent_n = 0
        # Per-bucket (not cumulative) counts of successful requests' durations.
        self.request_hist = [0] * (len(DURATION_BOUNDS_S) + 1)
        self.queue_hist = [0] * (len(DURATION_BOUNDS_S) + 1)
        self.compute_hist = [0] * (len(DURATION_BOUNDS_S) + 1)

    def request_done(self, request_s: float, queue_s: float, compute_s: float) -> None:
        self.request_success += 1
        self.request_s_total += request_s
        self.queue_s_total += queue_s
        self.compute_s_total += compute_s
        self._recent[self._recent_n % RECENT] = request_s
        self._recent_n += 1
        self.request_hist[bisect_left(DURATION_BOUNDS_S, request_s)] += 1
        self.queue_hist[bisect_left(DURATION_BOUNDS_S, queue_s)] += 1
        self.compute_hist[bisect_left(DURATION_BOUNDS_S, compute_s)] += 1

    def request_failed(self, code: str) -> None:
        self.request_failure += 1
        self.failures_by_code[code] = self.failures_by_code.get(code, 0) + 1

    def batch_done(self, rows: int) -> None:
        self.execution_count += 1
        self.inference_count += rows

    def snapshot(self) -> dict:
        n = min(self._recent_n, RECENT)
        recent = self._recent[:n]
        pct = (np.percentile(recent, [50, 90, 99]) * 1e3).tolist() if n else [0.0, 0.0, 0.0]
        ok = self.request_success
        return {
            "request_success": ok,
            "request_failure": self.request_failure,
            "failures_by_code": dict(self.failures_by_code),
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "avg_batch_size": (self.inference_count / self.execution_count
                               if self.execution_count else 0.0),
            "avg_request_ms": self.request_s_total / ok * 1e3 if ok else 0.0,
            "avg_queue_ms": self.queue_s_total / ok * 1e3 if ok else 0.0,
            "avg_compute_ms": self.compute_s_total / ok * 1e3 if ok else 0.0,
            "latency_ms": {"p50": pct[0], "p90": pct[1], "p99": pct[2], "window": n},
            "histograms": {
                "bounds_s": list(DURATION_BOUNDS_S),
                "request": list(self.request_hist), "request_sum_s": self.request_s_total,
                "queue": list(self.queue_hist), "queue_sum_s": self.queue_s_total,
                "compute": list(self.compute_hist), "compute_sum_s": self.compute_s_total,
            },
        }
