"""The holding queue of a version that is loading, on a FakeClock: bounded, each request
until its deadline, handed over in order or failed when the load ends, cancellable."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from appliance.observe.stats import VersionStats
from appliance.scheduling.holding import HoldingQueue
from appliance.scheduling.request import DONE, QUEUED, QueuedRequest, cancel_request
from tests.support.fake_clock import FakeClock

WHAT = "model 'm' version 3"


class Answers:
    """Done callbacks that note each answer by the request's name."""

    def __init__(self) -> None:
        self.got: list[tuple[str, object]] = []

    def request(self, name: str, deadline: float | None = None) -> QueuedRequest:
        return QueuedRequest({"x": np.zeros((1, 2), np.float32)}, 1, ((2,),), 0, deadline,
                             lambda out, err: self.got.append((name, err)), tag=name)


def _queue(limit: int = 8) -> tuple[HoldingQueue, FakeClock, VersionStats]:
    clock, stats = FakeClock(), VersionStats()
    return HoldingQueue(WHAT, limit, stats, clock), clock, stats


def test_past_its_limit_a_request_is_refused_at_once():
    q, _, stats = _queue(limit=2)
    answers = Answers()
    q.hold(answers.request("a"))
    q.hold(answers.request("b"))
    with pytest.raises(ResourceExhausted) as e:
        q.hold(answers.request("c"))
    assert str(e.value).endswith(f"{WHAT} is loading and 2 requests already wait for it; "
                                 f"retry shortly")
    assert len(q) == 2 and answers.got == []
    assert stats.failures_by_code == {"RESOURCE_EXHAUSTED": 1}


def test_a_held_request_expires_at_its_deadline_and_frees_its_place():
    q, clock, stats = _queue(limit=1)
    answers = Answers()
    clock.advance(1.0)
    r = answers.request("a", deadline=1.5)
    q.hold(r)
    assert r.enqueued == 1.0 and r.owner is q
    clock.advance(0.499)
    assert answers.got == [] and len(q) == 1
    clock.advance(0.001)
    ((name, err),) = answers.got
    assert name == "a" and isinstance(err, DeadlineExceeded)
    assert str(err).endswith(f"the request's timeout passed while {WHAT} was loading; raise "
                             f"timeout_ms or load it ahead (load = 'eager')")
    assert r.state == DONE and len(q) == 0
    assert stats.failures_by_code == {"DEADLINE_EXCEEDED": 1}
    q.hold(answers.request("b"))  # the expired one's place is free again
    handed = []
    q.release(handed.append)
    assert [h.tag for h in handed] == ["b"]


def test_a_deadline_already_past_expires_as_soon_as_the_clock_runs():
    q, clock, _ = _queue()
    answers = Answers()
    clock.advance(2.0)
    q.hold(answers.request("late", deadline=1.0))
    clock.advance(0.0)
    assert [(n, type(e)) for n, e in answers.got] == [("late", DeadlineExceeded)]


def test_release_hands_the_live_ones_over_in_order_with_their_timers_off():
    q, clock, stats = _queue()
    answers = Answers()
    reqs = [answers.request("a", deadline=5.0), answers.request("b"),
            answers.request("gone", deadline=5.0), answers.request("late", deadline=1.0),
            answers.request("c", deadline=9.0)]
    for r in reqs:
        q.hold(r)
    cancel_request(reqs[2])
    clock.advance(1.0)  # "late" expires
    handed = []
    q.release(handed.append)
    assert [h.tag for h in handed] == ["a", "b", "c"]
    assert all(h.state == QUEUED and h.timer is None and h.owner is None for h in handed)
    assert len(q) == 0 and clock.pending() == 0
    clock.advance(10.0)  # past every deadline: the new owner's to keep now, not ours
    assert [n for n, _ in answers.got] == ["late"]
    assert stats.failures_by_code == {"DEADLINE_EXCEEDED": 1}


def test_a_refusal_on_release_answers_that_request_and_the_others_go_on():
    q, _, _ = _queue()
    answers = Answers()
    for name in ("a", "bad", "c"):
        q.hold(answers.request(name))
    handed = []

    def submit(r: QueuedRequest) -> None:
        if r.tag == "bad":
            raise InvalidArgument("refused where it went")
        handed.append(r.tag)
    q.release(submit)
    assert handed == ["a", "c"]
    ((name, err),) = answers.got
    assert name == "bad" and isinstance(err, InvalidArgument)


def test_one_cancelled_by_an_earlier_ones_answer_is_skipped_on_release():
    q, _, _ = _queue()
    answers = Answers()
    first, second = answers.request("first"), answers.request("second")
    q.hold(first)
    q.hold(second)
    handed = []

    def submit(r: QueuedRequest) -> None:
        handed.append(r.tag)
        cancel_request(second)  # e.g. the first's answer closes the connection of both
    q.release(submit)
    assert handed == ["first"] and second.state == DONE and answers.got == []


def test_fail_answers_every_live_request_with_the_error_and_counts_it():
    q, clock, stats = _queue()
    answers = Answers()
    a, b, c = (answers.request("a", deadline=1.0), answers.request("b"),
               answers.request("c"))
    for r in (a, b, c):
        q.hold(r)
    cancel_request(c)
    q.fail(Unavailable(f"{WHAT} failed to load: boom; the request could not run"))
    assert [n for n, _ in answers.got] == ["a", "b"]
    assert all(isinstance(e, Unavailable) and "boom" in str(e) for _, e in answers.got)
    assert len(q) == 0 and clock.pending() == 0
    clock.advance(2.0)  # a's deadline: answered already, not again
    assert len(answers.got) == 2
    assert stats.failures_by_code == {"UNAVAILABLE": 2}


def test_a_cancelled_request_is_dropped_without_an_answer():
    q, clock, stats = _queue(limit=1)
    answers = Answers()
    r = answers.request("a", deadline=1.0)
    q.hold(r)
    cancel_request(r)  # the caller went away: through its owner, the holding queue
    assert r.state == DONE and len(q) == 0 and clock.pending() == 0
    clock.advance(2.0)
    q.hold(answers.request("b"))  # its place is free
    handed = []
    q.release(handed.append)
    assert [h.tag for h in handed] == ["b"] and answers.got == []
    assert stats.failures_by_code == {}
