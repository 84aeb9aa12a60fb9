"""The batching decision (pure, with explicit ages) and the batcher on a real event loop.

Its timing (queue delay, deadlines, the drain timeout) runs on a FakeClock: the test moves
time, so nothing here sleeps to wait for a timer. Engines still run on worker threads.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from appliance.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from appliance.observe.stats import VersionStats
from appliance.scheduling.batcher import ENGINE_FAILED, DynamicBatcher
from appliance.scheduling.instance import ModelInstance
from appliance.scheduling.policy import BatchPolicy, decide
from appliance.scheduling.request import QueuedRequest
from engines.base import Session, TensorSpec
from tests.support.fake_clock import FakeClock


def test_decide_full_batch_goes_at_once():
    p = BatchPolicy(max_batch_size=8, max_queue_delay_us=1000)
    assert decide(8, 0, p) == (8, 0.0)
    assert decide(20, 0, p) == (8, 0.0)


def test_decide_waits_for_the_delay_then_sends_what_is_there():
    p = BatchPolicy(max_batch_size=8, max_queue_delay_us=1000)
    assert decide(3, 200, p) == (0, 800)
    assert decide(3, 1000, p) == (3, 0.0)
    assert decide(3, 5000, p) == (3, 0.0)


def test_decide_preferred_size_goes_before_the_delay():
    p = BatchPolicy(max_batch_size=16, max_queue_delay_us=10_000,
                    preferred_batch_sizes=(4, 8))
    assert decide(3, 0, p) == (0, 10_000)
    assert decide(5, 0, p) == (4, 0.0)
    assert decide(9, 0, p) == (8, 0.0)


def test_decide_a_preferred_size_beats_a_full_batch_as_in_triton():
    """Triton: 'If the dynamic batcher can form a batch of a preferred size(s) it will
    create a batch of the largest possible preferred size'; max_batch_size stays the
    largest batch a single request may carry."""
    p = BatchPolicy(max_batch_size=32, preferred_batch_sizes=(1, 4))
    assert decide(64, 0, p) == (4, 0.0)
    assert decide(3, 0, p) == (1, 0.0)
    p = BatchPolicy(max_batch_size=8, max_queue_delay_us=100, preferred_batch_sizes=(6,))
    assert decide(20, 0, p) == (6, 0.0)
    assert decide(5, 0, p) == (0, 100)
    assert decide(5, 100, p) == (5, 0.0)


def test_decide_zero_delay_sends_immediately_and_empty_queue_waits():
    p = BatchPolicy(max_batch_size=8)
    assert decide(1, 0, p) == (1, 0.0)
    assert decide(0, 0, p)[0] == 0


class GatedSession(Session):
    """y = 2x, one call at a time, each call held until the test opens the gate."""

    def __init__(self) -> None:
        self.inputs = (TensorSpec("x", "float32", (-1, 4)),)
        self.outputs = (TensorSpec("y", "float32", (-1, 4)),)
        self.max_batch_size = 8
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[int] = []

    def run(self, feeds):
        self.gate.wait(10)
        self.batches.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}


def _request(x, done, priority=0, deadline=None):
    return QueuedRequest({"x": x}, len(x), (x.shape[1:],), priority, deadline, done)


def _run(coro):
    return asyncio.run(coro)


async def _settle(rounds: int = 5) -> None:
    """Let the loop run what timers fired or threads handed back (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def test_requests_batch_and_split_back_exactly():
    async def go():
        session = GatedSession()
        session.gate.clear()
        inst = ModelInstance(session, "t")
        b = DynamicBatcher(BatchPolicy(max_batch_size=8), [inst], VersionStats())
        results: dict[int, np.ndarray] = {}
        futs = []
        for i in range(7):
            fut = asyncio.get_running_loop().create_future()
            futs.append(fut)
            x = np.full((1 + i % 2, 4), i, np.float32)

            def done(out, err, i=i, fut=fut):
                results[i] = out["y"] if out else err
                fut.set_result(None)
            b.enqueue(_request(x, done))
        session.gate.set()
        await asyncio.gather(*futs)
        await b.stop()
        return session.batches, results

    batches, results = _run(go())
    assert batches[0] == 1  # the first went alone: the instance was idle
    assert sum(batches) == 1 + 2 + 1 + 2 + 1 + 2 + 1
    assert max(batches) > 1
    for i in range(7):
        assert results[i].shape == (1 + i % 2, 4)
        assert (results[i] == 2 * i).all()


def test_queue_full_is_refused_at_once_and_deadline_hits_queued_requests():
    async def go():
        session = GatedSession()
        session.gate.clear()
        inst = ModelInstance(session, "t")
        stats = VersionStats()
        clock = FakeClock()
        b = DynamicBatcher(BatchPolicy(max_batch_size=1, max_queue_size=2), [inst], stats,
                           clock=clock)
        outcomes = []
        done_all = asyncio.Event()

        def done(out, err):
            outcomes.append(err)
            if len(outcomes) == 4:
                done_all.set()
        x = np.ones((1, 4), np.float32)
        b.enqueue(_request(x, done))  # runs (held by the gate)
        b.enqueue(_request(x, done))  # formed ahead: the instance holds it next
        b.enqueue(_request(x, done, deadline=clock.now() + 0.05))  # waits, then expires
        b.enqueue(_request(x, done))
        with pytest.raises(ResourceExhausted):
            b.enqueue(_request(x, done))
        clock.advance(0.049)
        await _settle()
        assert outcomes == []
        clock.advance(0.001)
        await _settle()
        assert isinstance(outcomes[0], DeadlineExceeded)
        assert "in the queue" in str(outcomes[0])
        session.gate.set()
        await asyncio.wait_for(done_all.wait(), 5)
        await b.stop()
        return outcomes, stats

    outcomes, stats = _run(go())
    assert outcomes[1:] == [None, None, None]
    assert stats.request_success == 3 and stats.failures_by_code == {"DEADLINE_EXCEEDED": 1}


def test_priority_levels_run_lower_first():
    async def go():
        session = GatedSession()
        session.gate.clear()
        inst = ModelInstance(session, "t")
        b = DynamicBatcher(BatchPolicy(max_batch_size=1, priority_levels=3), [inst],
                           VersionStats(), clock=FakeClock())
        order = []
        finished = asyncio.Event()

        def make_done(tag):
            def done(out, err):
                order.append(tag)
                if len(order) == 6:
                    finished.set()
            return done
        x = np.ones((1, 4), np.float32)
        b.enqueue(_request(x, make_done("first"), priority=2))  # starts at once
        b.enqueue(_request(x, make_done("ahead"), priority=2))  # the batch formed ahead
        b.enqueue(_request(x, make_done("low-a"), priority=2))
        b.enqueue(_request(x, make_done("mid"), priority=1))
        b.enqueue(_request(x, make_done("low-b"), priority=2))
        b.enqueue(_request(x, make_done("high"), priority=0))
        session.gate.set()
        await asyncio.wait_for(finished.wait(), 5)
        await b.stop()
        return order

    assert _run(go()) == ["first", "ahead", "high", "mid", "low-a", "low-b"]


def test_shapes_that_disagree_are_not_batched_together():
    async def go():
        session = GatedSession()
        session.inputs = (TensorSpec("x", "float32", (-1, -1)),)
        session.gate.clear()
        inst = ModelInstance(session, "t")
        b = DynamicBatcher(BatchPolicy(max_batch_size=8), [inst], VersionStats())
        shapes = []
        finished = asyncio.Event()

        def done(out, err):
            shapes.append(out["y"].shape)
            if len(shapes) == 5:
                finished.set()
        for width in (4, 4, 3, 4, 3):
            x = np.ones((1, width), np.float32)
            b.enqueue(_request(x, done))
        session.gate.set()
        await asyncio.wait_for(finished.wait(), 5)
        await b.stop()
        return session.batches, shapes

    batches, shapes = _run(go())
    assert sorted(shapes) == [(1, 3)] * 2 + [(1, 4)] * 3
    assert sum(batches) == 5


def test_engine_failure_fails_the_batch_not_the_batcher(caplog):
    """The client hears the fixed INTERNAL message; the engine's words go to the log, once
    a minute with the count of failures since (here: the first, then none)."""
    class Failing(GatedSession):
        def run(self, feeds):
            if feeds["x"][0, 0] < 0:
                raise RuntimeError("boom")
            return super().run(feeds)

    async def go():
        b = DynamicBatcher(BatchPolicy(max_batch_size=1), [ModelInstance(Failing(), "t:1#0")],
                           VersionStats())
        out = []
        finished = asyncio.Event()

        def done(o, e):
            out.append(e)
            if len(out) == 3:
                finished.set()
        b.enqueue(_request(-np.ones((1, 4), np.float32), done))
        b.enqueue(_request(np.ones((1, 4), np.float32), done))
        b.enqueue(_request(-np.ones((1, 4), np.float32), done))
        await asyncio.wait_for(finished.wait(), 5)
        await b.stop()
        return out

    with caplog.at_level("ERROR", logger="outpost.batcher"):
        out = _run(go())
    assert out[0].code == "INTERNAL" and out[0].message == ENGINE_FAILED
    assert "boom" not in str(out[0])
    assert out[1] is None
    assert out[2].message == ENGINE_FAILED
    logged = [r for r in caplog.records if r.name == "outpost.batcher"]
    assert len(logged) == 1  # the second failure, within the minute, is not logged
    assert logged[0].error == "RuntimeError: boom" and logged[0].instance == "t:1#0"


def _hold_loop_after_opening(session: GatedSession, batches: int,
                             grace_s: float = 0.05) -> list[int]:
    """Open the gate, then keep the event loop from running until the worker has run
    ``batches`` batches and ``grace_s`` more (time for one more it might hold): whatever
    it runs meanwhile was handed to it before, not by the loop."""
    session.gate.set()
    t_end = time.monotonic() + 5
    while len(session.batches) < batches and time.monotonic() < t_end:
        time.sleep(0.001)
    time.sleep(grace_s)
    return list(session.batches)


def test_a_busy_instance_is_handed_the_next_full_batch_before_it_finishes():
    async def go():
        session = GatedSession()
        session.gate.clear()
        b = DynamicBatcher(BatchPolicy(max_batch_size=2), [ModelInstance(session, "t")],
                           VersionStats())
        answered = []
        finished = asyncio.Event()

        def done(out, err):
            answered.append(err)
            if len(answered) == 5:
                finished.set()
        x = np.ones((1, 4), np.float32)
        b.enqueue(_request(x, done))  # runs alone: the instance was idle
        for _ in range(4):  # two full batches queue; the first is handed over at once
            b.enqueue(_request(x, done))
        ran = _hold_loop_after_opening(session, 2)
        await asyncio.wait_for(finished.wait(), 5)
        await b.stop()
        return ran, session.batches, answered

    ran, batches, answered = _run(go())
    assert ran == [1, 2]  # the second batch ran while the loop was held
    assert batches == [1, 2, 2] and answered == [None] * 5


def test_a_partial_batch_is_not_formed_ahead_of_a_busy_instance():
    async def go():
        session = GatedSession()
        session.gate.clear()
        b = DynamicBatcher(BatchPolicy(max_batch_size=4), [ModelInstance(session, "t")],
                           VersionStats())
        finished = asyncio.Event()
        answered = []

        def done(out, err):
            answered.append(err)
            if len(answered) == 4:
                finished.set()
        x = np.ones((1, 4), np.float32)
        for _ in range(4):  # one runs; three wait and keep growing into one batch
            b.enqueue(_request(x, done))
        ran = _hold_loop_after_opening(session, 1)
        await asyncio.wait_for(finished.wait(), 5)
        await b.stop()
        return ran, session.batches

    ran, batches = _run(go())
    assert ran == [1]
    assert batches == [1, 3]


def test_a_batch_formed_ahead_never_overwrites_the_inputs_of_the_one_running():
    async def go(shared_buffers: bool):
        session = GatedSession()
        session.gate.clear()
        inst = ModelInstance(session, "t")
        if shared_buffers:  # what the test guards against: one set of buffers for both
            inst._staging = [inst._staging[0]] * len(inst._staging)
        b = DynamicBatcher(BatchPolicy(max_batch_size=2, max_queue_delay_us=10_000_000),
                           [inst], VersionStats())
        results: dict[int, np.ndarray] = {}
        finished = asyncio.Event()

        def make_done(i):
            def done(out, err):
                results[i] = out["y"]
                if len(results) == 6:
                    finished.set()
            return done
        for i in range(6):  # a batch of 2 runs (held), one is formed ahead, one waits
            b.enqueue(_request(np.full((1, 4), i, np.float32), make_done(i)))
        session.gate.set()
        await asyncio.wait_for(finished.wait(), 5)
        await b.stop()
        return session.batches, results

    batches, results = _run(go(shared_buffers=False))
    assert batches == [2, 2, 2]
    assert all((results[i] == 2 * i).all() for i in range(6))
    _, shared = _run(go(shared_buffers=True))
    assert not all((shared[i] == 2 * i).all() for i in range(6))


def test_a_window_that_fails_on_one_batcher_keeps_the_others_pending():
    from appliance.scheduling.window import BatchWindow

    class Fake:
        def __init__(self, fail: bool):
            self.fail, self.runs = fail, 0

        def window_closed(self):
            self.runs += 1
            if self.fail:
                raise RuntimeError("a bug")

    window = BatchWindow()
    bad, good = Fake(fail=True), Fake(fail=False)
    window.open()
    window.pending += [bad, good]
    with pytest.raises(RuntimeError):
        window.close()
    assert window.pending == [good] and good.runs == 0
    window.open()
    window.close()
    assert good.runs == 1 and not window.pending


def test_a_batch_that_fails_before_the_engine_is_not_timed_as_a_quick_run():
    """A failed gather (out of memory) must not count as a 0 s engine run: enough of those
    would make a slow model look quick enough to run on the event loop."""
    async def go():
        inst = ModelInstance(GatedSession(), "t")
        b = DynamicBatcher(BatchPolicy(max_batch_size=8), [inst], VersionStats())
        errors = []

        def broken_gather(batch):
            raise MemoryError("no room for the batch")
        inst.gather = broken_gather
        for _ in range(20):
            b.enqueue(_request(np.ones((1, 4), np.float32), lambda o, e: errors.append(e)))
        await b.stop()
        return b._timed, b._compute_ewma_s, errors

    timed, ewma, errors = _run(go())
    assert len(errors) == 20 and all(e.code == "INTERNAL" for e in errors)
    assert timed == 0 and ewma == 1.0  # untouched: nothing was measured


class ThreadNotingSession(Session):
    """y = x, noting the thread of each run; ``cost_s``: how long a run takes."""
    inline_ok = True

    def __init__(self, cost_s: float) -> None:
        self.inputs = (TensorSpec("x", "float32", (-1, 4)),)
        self.outputs = (TensorSpec("y", "float32", (-1, 4)),)
        self.max_batch_size = 8
        self.cost_s = cost_s
        self.threads: list[int] = []

    def run(self, feeds):
        self.threads.append(threading.get_ident())
        if self.cost_s:
            time.sleep(self.cost_s)
        return {"y": feeds["x"]}


@pytest.mark.parametrize("cost_s", [0.0, 0.002])
def test_only_a_model_timed_as_quick_runs_on_the_event_loop(cost_s):
    """After INLINE_MIN_SAMPLES batches on worker threads, a model far quicker than a
    thread hand-off runs on the loop itself; a slow one stays on the workers."""
    from appliance.scheduling.batcher import INLINE_MIN_SAMPLES

    async def go():
        session = ThreadNotingSession(cost_s)
        b = DynamicBatcher(BatchPolicy(max_batch_size=8), [ModelInstance(session, "t")],
                           VersionStats())
        loop = asyncio.get_running_loop()
        for _ in range(INLINE_MIN_SAMPLES + 40):  # one at a time: the instance is idle
            done = loop.create_future()
            b.enqueue(_request(np.ones((1, 4), np.float32),
                               lambda o, e, f=done: f.set_result(e)))
            assert await done is None
        await b.stop()
        return session.threads

    threads = _run(go())
    on_loop = [t == threading.get_ident() for t in threads]
    assert on_loop[:INLINE_MIN_SAMPLES] == [False] * INLINE_MIN_SAMPLES
    # Quick: on the loop from the 17th batch, unless a stall on this shared machine made
    # a run look slow for a while (then the average has to come down again).
    assert any(on_loop) == (cost_s == 0.0)
    if cost_s == 0.0:
        assert sum(on_loop[INLINE_MIN_SAMPLES:]) >= 20, on_loop


@pytest.mark.parametrize("delay_us", [0, 30_000])
def test_a_lone_request_waits_the_queue_delay_and_only_then(delay_us):
    """One request alone goes at once without a queue delay, and only after it with one
    (Triton's max_queue_delay_us: a batch may still grow meanwhile)."""
    async def go():
        session = GatedSession()
        clock = FakeClock()
        b = DynamicBatcher(BatchPolicy(max_batch_size=8, max_queue_delay_us=delay_us),
                           [ModelInstance(session, "t")], VersionStats(), clock=clock)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        b.enqueue(_request(np.ones((1, 4), np.float32),
                           lambda o, e: done.set_result(clock.now())))
        if delay_us:
            await _settle()
            assert not done.done() and b.queued_rows == 1  # still waiting for the delay
            clock.advance(delay_us / 1e6)
        waited = await asyncio.wait_for(done, 5)
        await b.stop()
        return waited, session.batches

    waited, batches = _run(go())
    assert batches == [1]
    assert waited == delay_us / 1e6  # on the clock: the delay when it has one, else none


def test_a_lone_request_behind_cancelled_ones_at_any_priority_runs_once():
    async def go():
        session = GatedSession()
        inst = ModelInstance(session, "t")
        b = DynamicBatcher(BatchPolicy(max_batch_size=8, priority_levels=3), [inst],
                           VersionStats())
        loop = asyncio.get_running_loop()
        session.gate.clear()  # the first request holds the instance
        first = loop.create_future()
        b.enqueue(_request(np.ones((1, 4), np.float32), lambda o, e: first.set_result(e)))
        answers = []
        gone = _request(np.zeros((1, 4), np.float32), lambda o, e: answers.append("gone"),
                        priority=0)
        b.enqueue(gone)
        b.enqueue(_request(np.full((1, 4), 3, np.float32),
                           lambda o, e: answers.append(o["y"].tolist()), priority=2))
        b.cancel(gone)  # now dead at the head of the priority-0 deque, the other one live
        session.gate.set()
        assert await first is None
        while not answers:
            await asyncio.sleep(0.01)
        await b.stop()
        return answers, session.batches

    answers, batches = _run(go())
    assert answers == [[[6.0] * 4]]
    assert batches == [1, 1]


def _futures(n: int) -> tuple[list[asyncio.Future], list]:
    """``n`` futures, and done callbacks that set them to the error (None: answered)."""
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in range(n)]
    return futs, [lambda o, e, f=f: f.set_result(e) for f in futs]


def test_the_queue_delay_fires_exactly_at_max_queue_delay_us():
    """Not a microsecond before: at delay - 1 us all still wait; at the delay what is
    queued goes as one batch. The delay counts from the oldest request, not the newest."""
    async def go():
        session = GatedSession()
        clock = FakeClock()
        b = DynamicBatcher(BatchPolicy(max_batch_size=8, max_queue_delay_us=1000),
                           [ModelInstance(session, "t")], VersionStats(), clock=clock)
        futs, dones = _futures(3)
        x = np.ones((1, 4), np.float32)
        b.enqueue(_request(x, dones[0]))
        clock.advance(400e-6)
        b.enqueue(_request(x, dones[1]))  # younger: the oldest's age decides
        b.enqueue(_request(x, dones[2]))
        clock.advance(599e-6)  # 999 us after the first
        await _settle()
        before = (b.queued_rows, list(session.batches), [f.done() for f in futs])
        clock.advance(1e-6)  # 1000 us
        after_rows = b.queued_rows  # handed to the instance within the advance
        errors = await asyncio.wait_for(asyncio.gather(*futs), 5)
        await b.stop()
        return before, after_rows, errors, session.batches

    before, after_rows, errors, batches = _run(go())
    assert before == (3, [], [False] * 3)
    assert after_rows == 0
    assert errors == [None] * 3 and batches == [3]


def test_a_preferred_batch_size_leaves_at_once_without_waiting_for_the_delay():
    async def go():
        session = GatedSession()
        clock = FakeClock()
        b = DynamicBatcher(BatchPolicy(max_batch_size=8, max_queue_delay_us=10_000_000,
                                       preferred_batch_sizes=(4,)),
                           [ModelInstance(session, "t")], VersionStats(), clock=clock)
        futs, dones = _futures(5)
        x = np.ones((1, 4), np.float32)
        for d in dones[:3]:
            b.enqueue(_request(x, d))
        await _settle()
        waiting = b.queued_rows
        b.enqueue(_request(x, dones[3]))  # four: a preferred size
        errors = await asyncio.wait_for(asyncio.gather(*futs[:4]), 5)
        went_at = clock.now()
        b.enqueue(_request(x, dones[4]))  # alone again: waits for the delay
        await _settle()
        left = b.queued_rows
        clock.advance(10.0)
        await asyncio.wait_for(futs[4], 5)
        await b.stop()
        return waiting, errors, went_at, left, session.batches

    waiting, errors, went_at, left, batches = _run(go())
    assert waiting == 3 and errors == [None] * 4
    assert went_at == 0.0  # the four went before the clock moved at all
    assert left == 1 and batches == [4, 1]  # the fifth only once the delay passed


def test_a_deadline_that_passes_in_the_queue_and_one_that_passes_while_running():
    """Either way the request is answered once, DEADLINE_EXCEEDED saying where and after
    how long; a running request's late result is dropped, the instance goes on."""
    async def go():
        session = GatedSession()
        session.gate.clear()
        clock = FakeClock()
        stats = VersionStats()
        b = DynamicBatcher(BatchPolicy(max_batch_size=1), [ModelInstance(session, "t")],
                           stats, clock=clock)
        answers: dict[str, list] = {"running": [], "ahead": [], "queued": []}

        def noting(name):
            return lambda o, e: answers[name].append(e)
        x = np.ones((1, 4), np.float32)
        b.enqueue(_request(x, noting("running"), deadline=0.010))  # runs, held by the gate
        b.enqueue(_request(x, noting("ahead")))  # formed ahead: no deadline
        b.enqueue(_request(x, noting("queued"), deadline=0.005))  # waits in the queue
        clock.advance(0.005)
        await _settle()
        queued_only = {k: len(v) for k, v in answers.items()}
        clock.advance(0.005)
        await _settle()
        session.gate.set()
        while not answers["ahead"]:
            await asyncio.sleep(0.001)  # the worker finishing the held batches
        await b.stop()
        return queued_only, answers, stats

    queued_only, answers, stats = _run(go())
    assert queued_only == {"running": 0, "ahead": 0, "queued": 1}
    (queued,), (running,), (ahead,) = answers["queued"], answers["running"], answers["ahead"]
    assert isinstance(queued, DeadlineExceeded)
    assert "in the queue after 5.0 ms" in str(queued)
    assert isinstance(running, DeadlineExceeded)
    assert "while running after 10.0 ms" in str(running)
    assert ahead is None
    assert stats.request_success == 1
    assert stats.failures_by_code == {"DEADLINE_EXCEEDED": 2}


def test_a_stop_that_times_out_on_the_clock_fails_what_is_still_queued():
    async def go():
        session = GatedSession()
        session.gate.clear()
        clock = FakeClock()
        b = DynamicBatcher(BatchPolicy(max_batch_size=1), [ModelInstance(session, "t")],
                           VersionStats(), clock=clock)
        futs, dones = _futures(3)
        x = np.ones((1, 4), np.float32)
        for d in dones:  # one runs (held), one is formed ahead, one waits
            b.enqueue(_request(x, d))
        stopping = asyncio.get_running_loop().create_task(b.stop(timeout_s=2.0))
        await _settle()
        clock.advance(1.999)
        await _settle()
        early = stopping.done()
        clock.advance(0.001)
        drained = await asyncio.wait_for(stopping, 5)
        queued_error = futs[2].result()
        session.gate.set()  # the abandoned worker finishes what it held, and exits
        held = await asyncio.wait_for(asyncio.gather(*futs[:2]), 5)
        return early, drained, queued_error, held, clock.pending()

    early, drained, queued_error, held, pending = _run(go())
    assert not early and drained is False
    assert isinstance(queued_error, Unavailable) and "unloaded" in str(queued_error)
    assert held == [None, None]
    assert pending == 0
