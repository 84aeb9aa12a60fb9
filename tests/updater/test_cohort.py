"""The fleet fraction (DESIGN section 5, normative) and the desired-version function."""

from __future__ import annotations

import math

import pytest

from updater.cohort import (
    Release,
    Rollout,
    cohort_point,
    desired_version,
    in_cohort,
    should_halt,
)

DEVICES = [f"device-{i:05d}" for i in range(10_000)]

# (rollout id, device id, first 8 bytes of sha256 in hex) computed with `sha256sum`.
VECTORS = [
    ("r1", "device-0001", "51ae9387789fccb4"),
    ("canary-7", "edge-42", "9c782a9dad33e19a"),
    ("mlp-3-abc", "dev", "afd6e180de286bf3"),
]


@pytest.mark.parametrize(("rollout", "device", "hex8"), VECTORS)
def test_point_matches_the_normative_formula(rollout, device, hex8):
    assert cohort_point(rollout, device) == int(hex8, 16) / 2**64


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.25])
def test_cohort_size_is_within_four_sigma(fraction):
    n = len(DEVICES)
    size = sum(in_cohort("rollout-a", fraction, {}, d, {}) for d in DEVICES)
    sigma = math.sqrt(n * fraction * (1 - fraction))
    assert abs(size - fraction * n) <= 4 * sigma, (size, fraction * n, sigma)


def test_raising_the_fraction_never_removes_a_device():
    previous: set[str] = set()
    for fraction in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.99, 1.0):
        cohort = {d for d in DEVICES if in_cohort("grow", fraction, {}, d, {})}
        assert previous <= cohort
        previous = cohort
    assert len(previous) == len(DEVICES)


def test_different_rollouts_draw_different_cohorts():
    a = {d for d in DEVICES if in_cohort("release-a", 0.1, {}, d, {})}
    b = {d for d in DEVICES if in_cohort("release-b", 0.1, {}, d, {})}
    # Independent draws overlap in about f^2 * n = 100 devices, far from all 1000.
    assert len(a & b) < 0.5 * min(len(a), len(b))


def test_selector_must_match_every_label():
    assert in_cohort("r", 1.0, {"site": "a"}, "d", {"site": "a", "hw": "x"})
    assert not in_cohort("r", 1.0, {"site": "a"}, "d", {"site": "b"})
    assert not in_cohort("r", 1.0, {"site": "a", "hw": "y"}, "d", {"site": "a", "hw": "x"})
    assert not in_cohort("r", 1.0, {"site": "a"}, "d", {})


def _rel(version, state="active", fraction=1.0, selector=None):
    return Release("m", version, f"releases/m/{version}.tar",
                   Rollout(f"m-{version}", fraction, selector or {}, state))


def test_desired_version_takes_the_highest_that_qualifies():
    rels = [_rel(1), _rel(2), _rel(3, fraction=0.0)]
    assert desired_version(rels, "m", "dev", {}).version == 2
    assert desired_version(rels, "m", "dev", {}, bad={2}).version == 1
    assert desired_version(rels, "other", "dev", {}) is None


def test_halted_version_falls_back_and_paused_keeps_only_current():
    rels = [_rel(1), _rel(2, state="halted")]
    assert desired_version(rels, "m", "dev", {}, current=2).version == 1
    rels = [_rel(1), _rel(2, state="paused")]
    assert desired_version(rels, "m", "dev", {}, current=1).version == 1
    assert desired_version(rels, "m", "dev", {}, current=2).version == 2


def test_auto_halt_needs_min_reports_and_threshold():
    r = Rollout("x", 0.1, {}, "active", failure_threshold=0.2, min_reports=5)
    assert not should_halt(r, ["failed"] * 4)
    assert should_halt(r, ["failed"] * 2 + ["committed"] * 3)
    assert not should_halt(r, ["failed"] + ["committed"] * 4)
    assert not should_halt(r, ["downloading"] * 10)


def test_validation_tolerances_follow_the_engine_precision():
    from updater.validation import tolerances

    assert tolerances(1e-3, 1e-4, "onnxruntime", "fp16") == (1e-3, 1e-4)  # CPU runs fp32
    assert tolerances(1e-3, 1e-4, "tensorrt", "fp32") == (1e-3, 1e-4)
    assert tolerances(1e-3, 1e-4, "tensorrt", "fp16") == (1e-2, 1e-2)
    assert tolerances(0.2, 1e-4, "tensorrt", "bf16") == (0.2, 5e-2)  # a wider config wins
