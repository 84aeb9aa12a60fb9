"""The health watch's verdict (pure): errors against the previous version, latency only
with enough requests, no traffic passes."""

from __future__ import annotations

from updater.health import Health, verdict, window

LIMITS = {"max_error_rate_increase": 0.05, "max_latency_ratio": 2.0, "min_requests": 20}


def test_no_traffic_passes():
    assert verdict(Health(0, 0, 0.0), Health(100, 1, 3.0), **LIMITS) is None


def test_error_rate_is_judged_against_the_previous_version():
    base = Health(90, 10, 3.0)  # 10% errors before
    assert verdict(Health(86, 14, 3.0), base, **LIMITS) is None  # 14% < 10% + 5%
    why = verdict(Health(80, 20, 3.0), base, **LIMITS)
    assert why is not None and "error rate 20.0% over 100 requests against 10.0%" in why
    assert verdict(Health(0, 1, 1.0), None, **LIMITS) is not None  # first install


def test_latency_needs_enough_requests_and_a_baseline():
    base = Health(100, 0, 2.0)
    assert "p50 latency 5.00 ms" in verdict(Health(50, 0, 5.0), base, **LIMITS)
    assert verdict(Health(19, 0, 5.0), base, **LIMITS) is None  # too few to judge
    assert verdict(Health(50, 0, 3.9), base, **LIMITS) is None
    assert verdict(Health(50, 0, 50.0), None, **LIMITS) is None


def test_window_subtracts_the_reading_at_activation():
    assert window(Health(10, 1, 1.0), Health(30, 4, 2.0)) == Health(20, 3, 2.0)
