"""A rollout's shadow phase as signed data: its limits checked on the CLI and in the
metadata a device reads, and the verdict on a device's figures (pure)."""

from __future__ import annotations

import json

import pytest

from appliance.cli.main import main
from tests.support.updater_support import Fleet
from updater.cohort import Rollout
from updater.fleet_repo import FleetRepo, releases_from_targets
from updater.shadow import (
    PASS,
    REJECT,
    WAIT,
    ShadowFigures,
    ShadowPolicy,
    ShadowPolicyError,
    parse_duration,
    shadow_verdict,
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, demo_files):
    f = Fleet(tmp_path_factory.mktemp("fleet") / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    return f


def test_rollout_signs_its_shadow_limits(fleet, capsys):
    code = main(["fleet", "rollout", str(fleet.dir), "identity", "2", "--fraction", "0.5",
                 "--shadow", "10m", "--shadow-min-requests", "500", "--max-disagreement",
                 "0.02", "--max-latency-ratio", "1.5", "--shadow-sample", "0.25"])
    assert code == 0, capsys.readouterr().err
    assert "shadow 600s, >= 500 requests" in capsys.readouterr().out
    targets = json.loads((fleet.dir / "metadata" / "targets.json").read_text())
    custom = targets["signed"]["targets"]["releases/identity/2.tar"]["custom"]["rollout"]
    assert custom["shadow"] == {"window_s": "600.0", "min_requests": 500,
                                "max_disagreement": "0.02", "max_latency_ratio": "1.5",
                                "sample": "0.25"}
    rel = FleetRepo(fleet.dir).release("identity", 2)
    assert rel.rollout.shadow == ShadowPolicy(600.0, 500, 0.02, 1.5, 0.25)
    # A promote keeps the shadow phase; a rollout without --shadow has none.
    assert main(["fleet", "promote", str(fleet.dir), "identity", "2", "--fraction", "1"]) == 0
    assert FleetRepo(fleet.dir).release("identity", 2).rollout.shadow.min_requests == 500
    assert main(["fleet", "rollout", str(fleet.dir), "identity", "2", "--fraction", "1"]) == 0
    assert FleetRepo(fleet.dir).release("identity", 2).rollout.shadow is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--shadow", "0s"], "--shadow 0.0 must be a duration above 0"),
    (["--shadow", "ten minutes"], "'ten minutes' is not a duration; write e.g. 30s"),
    (["--shadow", "8d"], "at most 604800s (7 days)"),
    (["--shadow", "1m", "--max-disagreement", "1.5"], "--max-disagreement 1.5 must be a share"),
    (["--shadow", "1m", "--max-latency-ratio", "0.9"], "--max-latency-ratio 0.9 must be in 1.."),
    (["--shadow", "1m", "--shadow-sample", "0"], "--shadow-sample 0.0 must be a share in (0"),
    (["--shadow", "1m", "--shadow-min-requests", "0"], "--shadow-min-requests 0 must be an "
                                                        "integer"),
    (["--max-disagreement", "0.1"], "give --shadow DURATION too"),
])
def test_shadow_limits_out_of_range_are_one_clear_error(fleet, capsys, flags, message):
    before = (fleet.dir / "metadata" / "targets.json").read_bytes()
    code = main(["fleet", "rollout", str(fleet.dir), "identity", "2", "--fraction", "1",
                 *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err, err
    assert err.count("\n") == 1
    assert (fleet.dir / "metadata" / "targets.json").read_bytes() == before  # nothing signed


def test_a_signed_rollout_with_limits_out_of_range_is_not_taken_and_says_why(fleet):
    repo = FleetRepo(fleet.dir)
    repo.set_rollout("identity", 2, new=True, fraction=1.0,
                     shadow=ShadowPolicy(60.0, max_disagreement=0.02))
    # Another tool signed a limit out of range: the device's reading of the metadata
    # names it and leaves the release alone.
    targets = dict(repo._load("targets").signed.targets)
    tf = targets["releases/identity/2.tar"]
    rollout = dict(tf.custom["rollout"])
    rollout["shadow"] = {**rollout["shadow"], "max_disagreement": "7"}
    tf.unrecognized_fields["custom"] = {**tf.custom, "rollout": rollout}
    repo._write_targets(targets)
    problems: list[str] = []
    signed = repo._load("targets").signed
    assert releases_from_targets(signed, problems) == []
    assert len(problems) == 1
    assert "releases/identity/2.tar not taken" in problems[0]
    assert "shadow max_disagreement 7.0 must be a share in 0..1" in problems[0]
    with pytest.raises(ShadowPolicyError, match="unknown limit 'colour'"):
        ShadowPolicy.from_custom({"window_s": "1.0", "colour": "red"})
    with pytest.raises(ShadowPolicyError, match="needs window_s"):
        Rollout.from_custom({"id": "r", "fraction": "1.0", "shadow": {}})


def test_durations():
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    assert parse_duration("250ms") == 0.25 and parse_duration("45") == 45


LIMITS = ShadowPolicy(window_s=10.0, min_requests=100, max_disagreement=0.02,
                      max_latency_ratio=1.5)


def test_verdict_waits_for_the_window_and_the_requests():
    assert shadow_verdict(ShadowFigures(5.0, 500, 500), LIMITS)[0] == WAIT
    verdict, why = shadow_verdict(ShadowFigures(60.0, 40, 40), LIMITS)
    assert verdict == WAIT and why.startswith("40 of 100 requests after 60s")
    assert shadow_verdict(ShadowFigures(10.0, 100, 99), LIMITS)[0] == PASS


def test_verdict_counts_errors_as_disagreement_and_judges_latency():
    verdict, why = shadow_verdict(ShadowFigures(10.0, 100, 97), LIMITS)
    assert verdict == REJECT and "disagreement 3.0% over 100 requests" in why
    fig = ShadowFigures(10.0, 98, 98, errors=3, error_codes={"shape_mismatch": 3})
    assert shadow_verdict(fig, LIMITS)[0] == REJECT and fig.disagreement == 3 / 101
    slow = ShadowFigures(10.0, 100, 100, p50_ms=4.0, p99_ms=9.0, live_p50_ms=2.0,
                         live_p99_ms=8.0)
    verdict, why = shadow_verdict(slow, LIMITS)
    assert verdict == REJECT and why.startswith("p50 latency 4.00 ms against 2.00 ms")
    tail = ShadowFigures(10.0, 100, 100, p50_ms=2.0, p99_ms=30.0, live_p50_ms=2.0,
                         live_p99_ms=8.0)
    verdict, why = shadow_verdict(tail, LIMITS)
    assert verdict == REJECT and why.startswith("p99 latency 30.00 ms against 8.00 ms")
    # p99 of fewer than 100 requests is their slowest one: not judged.
    assert shadow_verdict(ShadowFigures(10.0, 99, 99, p50_ms=2.0, p99_ms=30.0,
                                        live_p50_ms=2.0, live_p99_ms=8.0),
                          ShadowPolicy(10.0, 50, 0.02, 1.5))[0] == PASS
    # Below a millisecond a ratio is noise: not held against the candidate.
    fast = ShadowFigures(10.0, 100, 100, p50_ms=0.4, p99_ms=0.9, live_p50_ms=0.1,
                         live_p99_ms=0.2)
    assert shadow_verdict(fast, LIMITS)[0] == PASS
