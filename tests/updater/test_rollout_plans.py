"""Rollout plans: the checks of a plan, the planner's decisions with a fake clock, and a
real `outpost fleet serve` advancing (and halting) a planned rollout on signed reports."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.support.updater_support import Fleet, run_outpost, wait_for
from updater import report_auth
from updater.cohort import cohort_point
from updater.plans import Plan, PlanError, StageFigures, advance_decision, halt_reason
from updater.report_auth import device_key
from updater.shadow import ShadowFigures, ShadowPolicy

DEVICES = [f"d{i:03d}" for i in range(120)]


# -- the plan and the decisions, pure --------------------------------------------------------

@pytest.mark.parametrize(("stages", "words"), [
    ((0.05, 0.01, 1.0), "does not rise"),
    ((0.01, 0.01, 1.0), "does not rise"),
    ((0.01, 0.05, 0.5), "the last stage must be 100"),
    ((0.0, 0.5, 1.0), "stage 0% is outside (0, 100]"),
    ((0.01, 1.5), "stage 150% is outside (0, 100]"),
    ((), "needs 1..20 stages"),
])
def test_a_plan_out_of_range_is_refused_saying_why(stages, words):
    with pytest.raises(PlanError, match="--plan") as info:
        Plan(stages, 60.0).check()
    assert words in str(info.value)


def _fig(known=100, committed=0, final=None, failed=0, stage_final=0, stage_failed=0):
    return StageFigures(known, committed, committed + failed if final is None else final,
                        failed, stage_final, stage_failed)


def test_a_stage_advances_after_holding_its_commits_for_the_soak():
    plan = Plan((0.1, 0.5, 1.0), soak_s=60.0, min_committed=0.9)
    word = advance_decision(plan, 0.1, _fig(committed=89), None, None, now=1000.0)
    assert not word.advance and "89 of 100" in word.why and "90 needed" in word.why
    word = advance_decision(plan, 0.1, _fig(committed=90), None, None, now=1000.0)
    assert not word.advance and word.met_since == 1000.0 and word.may_advance_at == 1060.0
    word = advance_decision(plan, 0.1, _fig(committed=95), None, 1000.0, now=1059.0)
    assert not word.advance and "soaking" in word.why
    word = advance_decision(plan, 0.1, _fig(committed=95), None, 1000.0, now=1060.0)
    assert word.advance and "95 of 100" in word.why
    # A shadow policy: the cohort's aggregated agreement must be within the limit too.
    word = advance_decision(plan, 0.1, _fig(committed=95), (0.03, 0.01), 1000.0, 2000.0)
    assert not word.advance and "shadow agreement" in word.why and word.met_since is None
    assert advance_decision(plan, 1.0, _fig(committed=100), None, 0.0, 1e9).advance is False


def test_halts_apply_per_stage_with_a_minimum_of_executed_devices():
    # 3 of the 4 devices this stage added failed, but 4 < min_reports 5: not yet.
    assert halt_reason(0.1, 5, _fig(committed=50, failed=3, stage_final=4,
                                    stage_failed=3)) is None
    # The whole cohort is under the threshold (4 of 54), the stage's devices are not.
    why = halt_reason(0.1, 5, _fig(committed=50, failed=4, stage_final=5, stage_failed=4))
    assert why is not None and "4 of 5 reporting devices of this stage failed" in why


# -- a real fleet server ---------------------------------------------------------------------

@pytest.fixture
def fleet(tmp_path, demo_files):
    f = Fleet(tmp_path / "fleet")
    for version in (1, 2, 3):
        f.publish("identity", version, demo_files["identity"])
    f.start("--plan-check-s", "0.1")
    yield f
    f.stop()


def _post(fleet, device, reports, now=None) -> tuple[int, dict]:
    data = json.dumps({"reports": reports}).encode()
    headers = {"Content-Type": "application/json",
               **report_auth.sign(device_key(fleet.repo.report_secret(), device), device,
                                  data, now)}
    req = urllib.request.Request(f"{fleet.url}/v1/reports", data=data, method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _report(device, rollout_id, state, version=2, ts=None, **extra):
    return {"device_id": device, "model": "identity", "version": version,
            "rollout_id": rollout_id, "state": state, "detail": "",
            "ts": time.time() if ts is None else ts, "labels": {"site": "a"}, **extra}


def _report_all(fleet, rollout, state, devices, version=2, **extra):
    for d in devices:
        assert _post(fleet, d, [_report(d, rollout.id, state, version, **extra)]) == (
            200, {"accepted": 1, "ignored": []})


def _inside(rollout_id, fraction, devices=DEVICES):
    return [d for d in devices if cohort_point(rollout_id, d) < fraction]


def _rollout(fleet, version):
    return fleet.repo.release("identity", version).rollout


def _status(fleet, version) -> dict:
    out = run_outpost("fleet", "status", fleet.dir, "--json")
    assert out.returncode == 0, out.stderr
    return next(r for r in json.loads(out.stdout) if r["version"] == version)


def _known(fleet):
    """Every device reports once on the floor release, so the fleet knows them."""
    floor = fleet.repo.set_rollout("identity", 1, new=True, fraction=1.0)
    _report_all(fleet, floor, "committed", DEVICES, version=1)


def test_the_fleet_server_advances_a_plan_when_each_stage_committed_and_soaked(fleet):
    _known(fleet)
    out = run_outpost("fleet", "rollout", fleet.dir, "identity", "2", "--plan", "10,50,100",
                      "--soak", "1s", "--min-committed", "0.9")
    assert out.returncode == 0, out.stderr
    assert "plan 10,50,100%, soak 1s, >= 90% committed" in out.stdout
    r = _rollout(fleet, 2)
    assert r.fraction == 0.1 and r.plan.stages == (0.1, 0.5, 1.0)
    first = _inside(r.id, 0.1)
    # Nothing committed yet: the stage waits, and says for what.
    time.sleep(0.5)
    row = _status(fleet, 2)
    assert row["plan"]["stage"] == 1 and row["plan"]["next"] == 0.5
    assert f"0 of {len(first)} known cohort devices committed" in row["plan"]["waits_for"]
    assert row["plan"]["may_advance_at"] is None
    _report_all(fleet, r, "committed", first)
    wait_for(lambda: _rollout(fleet, 2).fraction == 0.5, 10, "stage 2")
    r = _rollout(fleet, 2)
    assert r.id == fleet.repo.release("identity", 2).rollout.id  # the same cohort, grown
    # Stage 2: the 10% devices stay in and count; the new ones must commit too.
    second = _inside(r.id, 0.5)
    assert set(first) <= set(second)
    text = run_outpost("fleet", "status", fleet.dir, "identity").stdout
    assert "plan stage 2 of 3 (50%, next 100%): waits for commits:" in text
    _report_all(fleet, r, "committed", [d for d in second if d not in first])
    wait_for(lambda: _rollout(fleet, 2).fraction == 1.0, 10, "stage 3")
    row = _status(fleet, 2)
    assert row["plan"]["stage"] == 3 and row["plan"]["next"] is None
    assert [f for f, _ in _rollout(fleet, 2).history] == [0.1, 0.5, 1.0]
    log = (fleet.dir / "server.log").read_text()
    assert "advanced to 50%" in log and "advanced to 100%" in log
    assert f"{len(first)} of {len(first)} known cohort devices committed" in log


def test_pause_holds_a_plan_and_a_failing_stage_halts_it(fleet):
    _known(fleet)
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.5, min_reports=3,
                               failure_threshold=0.2, plan=Plan((0.5, 1.0), 0.0, 0.5))
    first = _inside(r.id, 0.5)
    assert run_outpost("fleet", "pause", fleet.dir, "identity", "2").returncode == 0
    _report_all(fleet, r, "committed", first)
    time.sleep(0.6)
    assert _rollout(fleet, 2).fraction == 0.5  # paused: the plan waits
    assert "paused" in _status(fleet, 2)["plan"]["waits_for"]
    assert run_outpost("fleet", "resume", fleet.dir, "identity", "2").returncode == 0
    wait_for(lambda: _rollout(fleet, 2).fraction == 1.0, 10, "stage 2 after resume")
    # The devices stage 2 added fail: 3 of 3 executed, though the cohort as a whole
    # (the first stage's commits included) is under the threshold.
    added = [d for d in DEVICES if d not in first]
    assert len(added) >= 3 and 3 / (len(first) + 3) <= 0.2
    _report_all(fleet, r, "failed", added[:2])
    time.sleep(0.3)
    assert _rollout(fleet, 2).state == "active"  # 2 executed: below min_reports 3
    _report_all(fleet, r, "failed", added[2:3])
    wait_for(lambda: _rollout(fleet, 2).state == "halted", 10, "the halt")
    assert _rollout(fleet, 2).fraction == 1.0  # halted where it stood
    log = (fleet.dir / "server.log").read_text()
    assert "3 of 3 reporting devices of this stage failed" in log


def test_a_planned_rollout_with_a_shadow_policy_waits_for_agreement(fleet):
    _known(fleet)
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.25, min_reports=50,
                               plan=Plan((0.25, 1.0), 0.0, 0.5),
                               shadow=ShadowPolicy(60.0, 100, 0.01, 2.0))
    first = _inside(r.id, 0.25)
    disagreeing = ShadowFigures(elapsed_s=60, requests=100, agreed=90).as_report()
    _report_all(fleet, r, "shadow_passed", first, shadow=disagreeing)
    _report_all(fleet, r, "committed", first)
    time.sleep(0.6)
    assert _rollout(fleet, 2).fraction == 0.25
    assert "waits for shadow agreement: disagreement 10.00%" in \
        _status(fleet, 2)["plan"]["waits_for"]


def test_reports_unknown_from_the_future_or_for_a_stage_long_past_are_ignored(fleet):
    _known(fleet)
    r = fleet.repo.set_rollout("identity", 2, new=True, fraction=0.5, min_reports=1,
                               failure_threshold=0.0, plan=Plan((0.5, 1.0), 3600.0))
    d = _inside(r.id, 0.5)[0]
    cases = [(_report(d, "identity-2-nosuch", "failed"), "has no rollout 'identity-2-nosuch'"),
             (_report(d, r.id, "failed", ts=time.time() + 3600), "ahead of the fleet server"),
             (_report(d, r.id, "failed", ts=time.time() - 3600), "a stage long past")]
    status, answer = _post(fleet, d, [c for c, _ in cases])
    assert status == 200 and answer["accepted"] == 0
    assert [i["report"] for i in answer["ignored"]] == [0, 1, 2]
    for (_, words), ignored in zip(cases, answer["ignored"], strict=True):
        assert words in ignored["why"]
    # None of them counted: a single failure would have halted this rollout.
    time.sleep(0.3)
    assert _rollout(fleet, 2).state == "active"
    assert _status(fleet, 2)["devices"] == {}
    assert _post(fleet, d, [_report(d, r.id, "failed")])[1]["accepted"] == 1
    wait_for(lambda: _rollout(fleet, 2).state == "halted", 10, "the halt")


@pytest.mark.parametrize(("flags", "words"), [
    (["--plan", "5,1,100"], "does not rise"),
    (["--plan", "1,5,50"], "the last stage must be 100"),
    (["--plan", "0,50,100"], "outside (0, 100]"),
    (["--plan", "1,5,x"], "percentages separated by commas"),
    (["--plan", "1,100", "--soak", "soon"], "--soak 'soon' is not a duration"),
    (["--plan", "1,100", "--fraction", "0.1"], "not both"),
    (["--soak", "1m", "--fraction", "0.1"], "give --plan too"),
])
def test_cli_refuses_a_bad_plan_in_one_line(tmp_path, demo_files, flags, words):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 2, demo_files["identity"])
    before = (f.dir / "metadata" / "targets.json").read_bytes()
    out = run_outpost("fleet", "rollout", f.dir, "identity", "2", *flags)
    assert out.returncode == 1 and words in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert (f.dir / "metadata" / "targets.json").read_bytes() == before  # nothing signed
