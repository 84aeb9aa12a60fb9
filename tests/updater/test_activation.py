"""updater/activation.py with an injected clock: a release's activation window (midnight
included), on-request activation, the app's deferral and its cap, and the bad policies
and words refused with one line each."""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from updater.activation import (
    DEFAULT_MAX_DEFERRAL_S,
    WAITING_APP,
    WAITING_WINDOW,
    Activate,
    ActivationPolicy,
    ActivationPolicyError,
    AppWord,
    Wait,
    decide,
    next_window_start,
    parse_word,
    policy_from_flags,
    status,
)
from updater.fleet_repo import releases_from_targets

DAY = datetime(2025, 6, 2)  # a Monday; the clock is whatever the test says


def at(hhmm: str, day: int = 0) -> datetime:
    h, m = map(int, hhmm.split(":"))
    return DAY + timedelta(days=day, hours=h, minutes=m)


def window(text: str, max_deferral_s: float = DEFAULT_MAX_DEFERRAL_S) -> ActivationPolicy:
    policy = ActivationPolicy(window=text, max_deferral_s=max_deferral_s)
    policy.check()
    return policy


ON_REQUEST = ActivationPolicy(on_request=True, max_deferral_s=3600.0)


# -- the policy: flags, signed form, bad input ------------------------------------------

def test_flags_make_a_checked_policy_or_none():
    assert policy_from_flags(None, None, None) is None  # no policy: activated at once
    p = policy_from_flags("02:00-04:00", None, None)
    assert (p.window, p.on_request, p.max_deferral_s) == ("02:00-04:00", False, 86400.0)
    p = policy_from_flags(None, "on-request", "2h")
    assert (p.window, p.on_request, p.max_deferral_s) == ("", True, 7200.0)
    assert "up to 2h after it is ready" in p.describe()


@pytest.mark.parametrize(("flags", "says"), [
    (("2:00-4:00", None, None), "'2:00-4:00' is not a window; write HH:MM-HH:MM"),
    (("02:00 to 04:00", None, None), "is not a window"),
    (("25:00-26:00", None, None), "has no such time of day"),
    (("02:00-02:00", None, None), "starts where it ends"),
    (("", None, None), "--activate-window '' names no window"),
    ((" , ", None, None), "names no window"),
    ((None, "now", None), "--activate 'now': the one mode is on-request"),
    (("02:00-04:00", "on-request", None), "not both"),
    ((None, None, "24h"), "--max-deferral belongs to an activation policy"),
    ((None, "on-request", "soon"), "--max-deferral 'soon' is not a duration"),
    ((None, "on-request", "0s"), "must be above 0"),
    (("02:00-04:00", None, "31d"), "at most 2592000s (30 days)"),
])
def test_bad_flags_are_one_clear_error(flags, says):
    with pytest.raises(ActivationPolicyError) as err:
        policy_from_flags(*flags)
    assert says in str(err.value)
    if flags[0] and "window" in says:
        assert "--activate-window" in str(err.value)  # where: the flag, not download_windows


def test_the_signed_form_round_trips_and_a_bad_one_is_refused():
    for p in (window("22:00-04:00", 5400.0), ON_REQUEST):
        custom = p.as_custom()
        assert all(not isinstance(v, float) for v in custom.values())  # canonical JSON
        assert ActivationPolicy.from_custom(custom) == p
    for bad in ({"window": "later"}, {"window": 2}, {"on_request": "yes"},
                {"window": "02:00-04:00", "on_request": True}, {},
                {"window": "02:00-04:00", "max_deferral_s": "forever"},
                {"window": "02:00-04:00", "max_deferral_s": "-1.0"},
                {"window": "02:00-04:00", "when": "now"}, ["02:00-04:00"]):
        with pytest.raises(ActivationPolicyError):
            ActivationPolicy.from_custom(bad)


def test_a_device_does_not_take_a_release_whose_signed_policy_it_cant_follow():
    def target(version, activation):
        return SimpleNamespace(custom={"model": "m", "version": version, "rollout": None,
                                       "activation": activation})

    targets = SimpleNamespace(targets={
        "releases/m/2": target(2, {"window": "2am-4am"}),
        "releases/m/3": target(3, {"window": "02:00-04:00", "max_deferral_s": "60.0"})})
    problems: list[str] = []
    releases = releases_from_targets(targets, problems)
    assert [r.version for r in releases] == [3]
    assert releases[0].activation == window("02:00-04:00", 60.0)
    [problem] = problems
    assert "releases/m/2 not taken: its signed activation policy is bad" in problem
    assert "'2am-4am' is not a window" in problem


# -- windows ---------------------------------------------------------------------------

def test_a_windowed_release_waits_for_its_window_then_activates():
    p = window("02:00-04:00")
    ready = at("12:00")
    d = decide(at("12:00"), p, ready)
    assert d == Wait(WAITING_WINDOW, at("02:00", 1), d.detail)
    assert d.detail.startswith("until 2025-06-03 02:00, when the activation window "
                               "02:00-04:00 (local time) opens")
    assert isinstance(decide(at("01:59", 1), p, ready), Wait)
    assert decide(at("02:00", 1), p, ready) == Activate(
        "inside the activation window 02:00-04:00 (local time)")
    assert isinstance(decide(at("03:59", 1), p, ready), Activate)
    late = decide(at("04:00", 1), p, ready)  # the end is excluded: the next night's
    assert isinstance(late, Wait) and late.until == at("02:00", 2)


@pytest.mark.parametrize(("now", "activates", "until"), [
    (at("21:00"), False, at("22:00")),
    (at("22:00"), True, None),
    (at("23:59"), True, None),
    (at("00:00", 1), True, None),
    (at("03:59", 1), True, None),
    (at("04:00", 1), False, at("22:00", 1)),
    (at("12:00", 1), False, at("22:00", 1)),
])
def test_a_window_that_spans_midnight(now, activates, until):
    d = decide(now, window("22:00-04:00"), at("20:00"))
    assert isinstance(d, Activate) is activates
    if not activates:
        assert d.state == WAITING_WINDOW and d.until == until


def test_the_next_of_several_windows():
    p = window("01:00-02:00, 13:00-14:00")
    assert next_window_start(p.windows, at("03:00")) == at("13:00")
    assert next_window_start(p.windows, at("14:30")) == at("01:00", 1)
    assert next_window_start(window("00:00-24:00").windows, at("10:00")) == at("00:00", 1)
    assert isinstance(decide(at("10:00"), window("00:00-24:00"), at("10:00")), Activate)


# -- the app's word ----------------------------------------------------------------------

def test_on_request_waits_for_the_apps_allow():
    ready = at("10:00")
    d = decide(at("10:30"), ON_REQUEST, ready)
    assert d.state == WAITING_APP and d.until == at("11:00")  # the release's maximum
    assert "waiting for the app to allow it" in d.detail
    assert "held at most until 2025-06-02 11:00" in d.detail
    assert decide(at("10:30"), ON_REQUEST, ready, AppWord("allow")) == Activate(
        "allowed by the app")


def test_without_the_apps_word_an_on_request_release_activates_at_its_maximum():
    d = decide(at("11:00"), ON_REQUEST, at("10:00"))
    assert isinstance(d, Activate) and d.past_deferral
    assert "activated past the app's deferral (waiting for the app to allow it" in d.detail
    assert "at most 1h after it was ready (2025-06-02 10:00)" in d.detail


def test_a_deferral_holds_a_window_then_the_window_decides():
    p = window("02:00-04:00")
    ready = at("02:00")
    word = AppWord("defer", at("03:00"))
    d = decide(at("02:10"), p, ready, word)
    assert d == Wait(WAITING_APP, at("03:00"), "deferred by the app until 2025-06-02 03:00")
    assert decide(at("03:00"), p, ready, word) == Activate(
        "inside the activation window 02:00-04:00 (local time)")  # within its maximum
    # An allow lifts the app's own deferral, but never opens a window.
    assert isinstance(decide(at("02:10"), p, ready, AppWord("allow")), Activate)
    assert decide(at("05:00"), p, ready, AppWord("allow")).state == WAITING_WINDOW


def test_a_deferral_past_the_maximum_is_held_only_to_the_maximum_and_reported():
    ready = at("10:00")
    word = AppWord("defer", at("15:00"))  # 5 h asked for; the release allows 1 h
    d = decide(at("10:05"), ON_REQUEST, ready, word)
    assert d.state == WAITING_APP and d.until == at("11:00")
    assert "deferred by the app until 2025-06-02 15:00; held at most until " \
           "2025-06-02 11:00" in d.detail
    d = decide(at("11:00"), ON_REQUEST, ready, word)
    assert isinstance(d, Activate) and d.past_deferral
    assert "deferred by the app until 2025-06-02 15:00" in d.detail
    # A deferral with no end is held as long as the release allows.
    assert decide(at("10:59"), ON_REQUEST, ready, AppWord("defer")).until == at("11:00")
    assert decide(at("11:00"), ON_REQUEST, ready, AppWord("defer")).past_deferral


def test_past_the_maximum_a_windowed_release_still_waits_for_its_window():
    p = window("02:00-04:00", 3600.0)
    ready = at("02:30")
    word = AppWord("defer")
    d = decide(at("03:30"), p, ready, word)  # the maximum ran out inside the window
    assert isinstance(d, Activate) and d.past_deferral
    d = decide(at("05:00"), p, ready, word)  # outside it: the window is the fleet's rule
    assert d.state == WAITING_WINDOW and d.until == at("02:00", 1)
    assert "the app's deferral ran out" in d.detail
    d = decide(at("02:00", 1), p, ready, word)
    assert isinstance(d, Activate) and d.past_deferral


@pytest.mark.parametrize(("fields", "says"), [
    ({"action": "later"}, "action 'later' must be \"allow\" or \"defer\""),
    ({"action": 1}, "must be \"allow\" or \"defer\""),
    ({"action": "allow", "for_s": 10}, "for_s belongs to action \"defer\""),
    ({"action": "defer", "for_s": -5}, "for_s -5 must be a number of seconds above 0"),
    ({"action": "defer", "for_s": 0}, "above 0"),
    ({"action": "defer", "for_s": True}, "above 0"),
    ({"action": "defer", "for_s": "1h"}, "above 0"),
    ({"action": "defer", "for_s": float("inf")}, "above 0"),
    ({"action": "allow", "model": 3}, "model 3 must be a model name"),
    ({"action": "allow", "until": 3}, "unknown field 'until'"),
])
def test_bad_words_are_refused(fields, says):
    with pytest.raises(ActivationPolicyError) as err:
        parse_word(fields)
    assert says in str(err.value)


def test_good_words():
    assert parse_word({}) == ("", None, None)
    assert parse_word({"action": "allow", "model": "m"}) == ("allow", None, "m")
    assert parse_word({"action": "defer", "for_s": 90}) == ("defer", 90.0, None)


def test_status_says_what_an_update_waits_for():
    s = status(at("10:30"), ON_REQUEST, None, AppWord())
    assert s["state"] == "preparing" and s["ready_at"] is None
    s = status(at("10:30"), ON_REQUEST, at("10:00"), AppWord("defer", at("10:45")))
    assert (s["state"], s["until"], s["ready_at"], s["activate_by"]) == (
        WAITING_APP, "2025-06-02 10:45", "2025-06-02 10:00", "2025-06-02 11:00")
    assert s["app"] == {"action": "defer", "until": "2025-06-02 10:45"}
    s = status(at("10:30"), ON_REQUEST, at("10:00"), AppWord("allow"))
    assert s["state"] == "activating"
