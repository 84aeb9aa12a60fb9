"""VersionStats folds durations in bulk; its figures must equal a request-at-a-time count."""

from __future__ import annotations

from bisect import bisect_left

import numpy as np
import pytest

from appliance.observe.stats import DURATION_BOUNDS_S, FOLD_AT, RECENT, VersionStats


def _reference(samples):
    """The figures counted one request at a time, the plain way."""
    hists = [[0] * (len(DURATION_BOUNDS_S) + 1) for _ in range(3)]
    sums = [0.0, 0.0, 0.0]
    for sample in samples:
        for i, d in enumerate(sample):
            hists[i][bisect_left(DURATION_BOUNDS_S, d)] += 1
            sums[i] += d
    return hists, sums


@pytest.mark.parametrize("n", [0, 1, FOLD_AT - 1, FOLD_AT, 3 * FOLD_AT + 7, RECENT + 100])
def test_folded_figures_equal_a_request_at_a_time_count(n):
    rng = np.random.default_rng(n)
    # Log-spread durations, and some exactly on bucket bounds ("less or equal" bounds).
    values = 10 ** rng.uniform(-6, 1.5, size=(n, 3))
    on_bounds = rng.choice(DURATION_BOUNDS_S, size=(n, 3))
    pick = rng.random((n, 3)) < 0.2
    samples = [tuple(float(x) for x in row) for row in np.where(pick, on_bounds, values)]
    stats = VersionStats()
    for i, sample in enumerate(samples):
        stats.request_done(*sample)
        if i == n // 2:
            assert stats.request_success == i + 1  # counted before any fold
    hists, sums = _reference(samples)
    snap = stats.snapshot()
    assert snap["request_success"] == stats.request_success == n
    assert [stats.request_hist, stats.queue_hist, stats.compute_hist] == hists
    assert snap["histograms"]["request"] == hists[0]
    for got, want in zip((stats.request_s_total, stats.queue_s_total,
                          stats.compute_s_total), sums):
        assert got == pytest.approx(want, rel=1e-12)
    recent = [s[0] for s in samples[-RECENT:]]
    assert snap["latency_ms"]["window"] == len(recent)
    if recent:
        assert snap["latency_ms"]["p50"] == pytest.approx(np.percentile(recent, 50) * 1e3)
        assert snap["latency_ms"]["p99"] == pytest.approx(np.percentile(recent, 99) * 1e3)


def test_pending_durations_stay_bounded():
    stats = VersionStats()
    for _ in range(10 * FOLD_AT):
        stats.request_done(0.001, 0.0, 0.001)
    assert len(stats._pending) < FOLD_AT
    assert stats.request_success == 10 * FOLD_AT
