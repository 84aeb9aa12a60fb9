"""Per model-version figures: requests, failures, batches and latencies.

Updated on the event loop only (no locks); read by the `stats` op and by /metrics
(appliance/metrics.py), which therefore report the same figures. Latency percentiles come
from a ring of the most recent requests, and durations are counted into fixed histogram
buckets, so memory stays fixed.
"""

from __future__ import annotations

import numpy as np

RECENT = 4096
# Upper bounds (seconds, "less or equal") of the duration histograms; one more bucket: +Inf.
DURATION_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


FOLD_AT = 512  # durations kept as they come, then folded into the figures together


class _Folded:
    """A figure of ``VersionStats`` read with every pending duration folded in: item
    ``index`` (request, queue, compute) of its ``_sums`` or ``_hists``."""

    __slots__ = ("field", "index")

    def __init__(self, field: str, index: int):
        self.field = field
        self.index = index

    def __get__(self, stats: VersionStats | None, owner=None):
        if stats is None:  # looked up on the class
            return self
        stats._fold()
        return getattr(stats, self.field)[self.index]


class VersionStats:
    __slots__ = (
        "request_failure", "failures_by_code", "inference_count", "execution_count",
        "_success", "_sums", "_recent", "_recent_n", "_hists", "_pending",
    )

    def __init__(self) -> None:
        self.request_failure = 0
        self.failures_by_code: dict[str, int] = {}
        self.inference_count = 0  # rows run (a batch of 8 counts 8)
        self.execution_count = 0  # engine calls
        self._success = 0  # folded so far; request_success adds the pending ones
        self._sums = [0.0, 0.0, 0.0]  # request, queue, compute seconds
        self._recent = np.zeros(RECENT, dtype=np.float64)
        self._recent_n = 0
        # Per-bucket (not cumulative) counts of successful requests' durations: request,
        # queue, compute.
        self._hists = [[0] * (len(DURATION_BOUNDS_S) + 1) for _ in range(3)]
        # (request_s, queue_s, compute_s) of answered requests not yet folded in: one list
        # append a request, where three histogram lookups and the sums cost 5x more on the
        # loop thread; every reader folds them first.
        self._pending: list[tuple[float, float, float]] = []

    def clear(self) -> None:
        """Back to no figures (after the request a load sends itself to warm its path)."""
        self.__init__()

    def request_done(self, request_s: float, queue_s: float, compute_s: float) -> None:
        pending = self._pending
        pending.append((request_s, queue_s, compute_s))
        if len(pending) >= FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        durations = np.array(pending, dtype=np.float64)  # (n, 3)
        n = len(durations)
        self._success += n
        for i, column in enumerate(durations.T):
            self._sums[i] += float(column.sum())
            # bisect_left, as the buckets are "less or equal" bounds
            buckets = np.searchsorted(DURATION_BOUNDS_S, column, side="left")
            counts = np.bincount(buckets, minlength=len(DURATION_BOUNDS_S) + 1)
            hist = self._hists[i]
            for b in np.flatnonzero(counts).tolist():
                hist[b] += int(counts[b])
        at = (self._recent_n + np.arange(n)) % RECENT
        self._recent[at[-RECENT:]] = durations[-RECENT:, 0]
        self._recent_n += n

    @property
    def request_success(self) -> int:
        return self._success + len(self._pending)

    request_s_total = _Folded("_sums", 0)
    queue_s_total = _Folded("_sums", 1)
    compute_s_total = _Folded("_sums", 2)
    request_hist = _Folded("_hists", 0)
    queue_hist = _Folded("_hists", 1)
    compute_hist = _Folded("_hists", 2)

    def request_failed(self, code: str) -> None:
        self.request_failure += 1
        self.failures_by_code[code] = self.failures_by_code.get(code, 0) + 1

    def batch_done(self, rows: int) -> None:
        self.execution_count += 1
        self.inference_count += rows

    def snapshot(self) -> dict:
        self._fold()
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
