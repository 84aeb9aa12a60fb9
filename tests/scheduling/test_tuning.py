"""Measuring how a model runs best here (scheduling/tuning.py): candidates, the rule, the
batch sweep on a stand-in engine whose costs are exact, and the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.scheduling import tuning
from appliance.scheduling.tuning import (
    Want,
    candidate_sizes,
    candidates,
    choose,
    choose_batch,
    measure_batches,
    measure_layouts,
    read_cached,
    resolve_layout,
)
from engines.base import Session, TensorSpec
from engines.errors import RunError


class Clock:
    """Time that passes only when the stand-in engine runs: the measuring is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class CostedSession(Session):
    """An engine whose batch of n rows takes ``per_call_s + n * per_row_s`` on ``clock``,
    divided among its threads as ``speedup[threads]`` says."""

    def __init__(self, clock: Clock, per_call_s: float, per_row_s: float, threads: int = 1,
                 speedup: dict | None = None, fails_over: int | None = None, shape=(3, 8),
                 wake_s: float = 0.0):
        self.clock = clock
        self.wake_s = wake_s  # a run that starts after a pause pays this (threads asleep)
        self.ended = 0.0
        self.per_call_s, self.per_row_s = per_call_s, per_row_s
        self.factor = 1 / (speedup or {}).get(threads, 1.0)
        self.fails_over = fails_over
        self.inputs = (TensorSpec("x", "float32", (-1, *shape)),)
        self.outputs = (TensorSpec("y", "float32", (-1, *shape)),)
        self.max_batch_size = 32
        self.calls: list[int] = []
        self.closed = False

    def run(self, feeds):
        x = feeds["x"]
        assert x.dtype == np.float32
        assert all(w in (g, -1) for w, g in zip(self.inputs[0].shape[1:], x.shape[1:]))
        n = len(x)
        if self.fails_over is not None and n > self.fails_over:
            raise RunError(f"out of device memory at batch {n}")
        self.calls.append(n)
        if self.clock.now > self.ended:
            self.clock.now += self.wake_s
        self.clock.now += (self.per_call_s + n * self.per_row_s) * self.factor
        self.ended = self.clock.now
        return {"y": x}

    def close(self) -> None:
        self.closed = True


def test_candidate_sizes_double_up_to_the_limit():
    assert candidate_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert candidate_sizes(12) == [1, 2, 4, 8, 12]
    assert candidate_sizes(1) == [1]


def test_the_candidates_fit_the_cores_and_what_is_fixed():
    assert candidates(Want(cores=2, max_batch_size=32)) == [
        (1, 1, False), (1, 2, False), (2, 1, False), (2, 1, True)]
    four = candidates(Want(cores=4, max_batch_size=32))
    assert all(t * i <= 4 for t, i, _ in four) and (4, 1, True) in four and (1, 4, False) in four
    assert candidates(Want(cores=3, max_batch_size=8)) == [
        (1, 1, False), (1, 2, False), (1, 3, False), (2, 1, False), (2, 1, True),
        (3, 1, False), (3, 1, True)]
    assert candidates(Want(cores=8, max_batch_size=8, threads=2, instances=1,
                           spinning=False)) == [(2, 1, False)]
    assert candidates(Want(cores=1, max_batch_size=8)) == [(1, 1, False)]
    # A GPU engine: no intra-op threads; one or two contexts
    assert candidates(Want(cores=6, max_batch_size=8, threads=1, spinning=False,
                           thread_counts=False)) == [(1, 1, False), (1, 2, False)]


def _row(t, i, spin, latency_ms, rows):
    return {"threads": t, "instances": i, "spinning": spin, "latency_s": latency_ms / 1e3,
            "rows_per_s": rows, "preferred_batch": 1}


def test_the_rule_best_throughput_within_the_latency_bound():
    rows = [_row(1, 1, False, 4.0, 240), _row(1, 2, False, 4.0, 300),
            _row(2, 1, True, 2.2, 260), _row(2, 1, False, 2.4, 200)]
    # Two instances serve most, but one thread's c=1 latency is far past 2.2 ms + 15%;
    # of the two-thread layouts, spinning serves more than 10% more.
    assert choose(rows) == rows[2]
    # On as many cores, within 3% of spinning's throughput, but 9% slower at c=1:
    # spinning still.
    rows[3]["rows_per_s"] = 255
    assert choose(rows) == rows[2]
    # Within 3% of it at c=1 as well: as good, and spinning is taken.
    rows[3]["latency_s"] = 2.25e-3
    assert choose(rows) == rows[2]
    # Measurably quicker at c=1 without spinning: not spinning.
    rows[3]["latency_s"] = 2.1e-3
    assert choose(rows) == rows[3]
    # More cores must serve more than 10% more to be taken.
    assert choose([_row(1, 1, False, 2.0, 300), _row(2, 1, False, 2.0, 320)])["threads"] == 1
    assert choose([_row(1, 1, False, 2.0, 280), _row(2, 1, False, 2.0, 320)])["threads"] == 2
    tie = [_row(2, 1, True, 2.0, 300), _row(2, 1, False, 2.0, 295), _row(1, 1, False, 2.2, 294)]
    assert choose(tie) == tie[2]  # fewer cores, within 10%
    tie.pop()
    assert choose(tie) == tie[0]  # within 3% on both counts: spinning
    spin = [_row(2, 1, True, 2.0, 300), _row(2, 1, False, 2.0, 285)]
    assert choose(spin) == spin[0]  # spinning serves 5% more: taken
    calm = [_row(2, 1, True, 2.0, 285), _row(2, 1, False, 2.0, 300)]
    assert choose(calm) == calm[1]  # not spinning serves 5% more: taken
    spin = [_row(2, 1, True, 1.8, 296), _row(2, 1, False, 2.0, 300)]
    assert choose(spin) == spin[0]  # as much served, 10% quicker at c=1: taken


def test_the_smallest_batch_within_the_tolerance_of_the_best_wins():
    assert choose_batch({1: 100.0, 2: 180.0, 4: 200.0, 8: 205.0}) == 4
    assert choose_batch({1: 196.0, 2: 189.0, 16: 185.0, 32: 205.0}) == 1  # flat: no batching
    assert choose_batch({1: 10.0, 32: 300.0}) == 32


def test_a_per_call_cost_makes_big_batches_pay_and_a_per_row_cost_does_not():
    clock = Clock()
    overhead_bound = CostedSession(clock, per_call_s=0.002, per_row_s=0.00001)
    rates = measure_batches(overhead_bound, candidate_sizes(32), tuning._Clock(clock, 3.0),
                            clock)
    assert sorted(rates) == [1, 2, 4, 8, 16, 32]
    assert choose_batch(rates) == 32
    assert rates[32] == pytest.approx(32 / (0.002 + 32 * 0.00001))
    compute_bound = CostedSession(clock, per_call_s=0.000005, per_row_s=0.004)
    assert choose_batch(measure_batches(compute_bound, candidate_sizes(32),
                                        tuning._Clock(clock, 3.0), clock)) == 1


def test_a_slow_model_is_measured_within_the_budget_and_a_failing_size_ends_it():
    clock = Clock()
    slow = CostedSession(clock, per_call_s=0.0, per_row_s=1.0)  # a second a row
    rates = measure_batches(slow, candidate_sizes(32), tuning._Clock(clock, 3.0), clock)
    assert list(rates) == [1]  # batch 2 would not fit in what is left
    assert clock.now <= 5.0
    limited = CostedSession(clock, per_call_s=0.002, per_row_s=0.00001, fails_over=8)
    rates = measure_batches(limited, candidate_sizes(32), tuning._Clock(clock, 3.0), clock)
    assert list(rates) == [1, 2, 4, 8]
    assert max(limited.calls) == 8


def _costed_engine(clock: Clock, speedup: dict, made: list):
    def make_session(threads: int, spinning: bool) -> Session:
        s = CostedSession(clock, per_call_s=0.00005, per_row_s=0.003, threads=threads,
                          speedup=speedup)
        made.append(s)
        return s
    return make_session


def test_measuring_picks_the_threads_that_cut_the_latency_and_closes_its_sessions():
    """Two threads run a batch 1.8x quicker: within the bound only they are, so they win;
    instances are fixed at one, so nothing runs concurrently on the wall clock."""
    clock = Clock()
    made: list = []
    layout, table = measure_layouts(_costed_engine(clock, {1: 1.0, 2: 1.8}, made),
                                    Want(cores=2, max_batch_size=8, instances=1,
                                         spinning=False), clock=clock)
    assert (layout.threads, layout.instances, layout.spinning) == (2, 1, False)
    assert layout.preferred_batch == 1  # the per-row cost dominates: no batch pays
    assert layout.source == "measured" and "bound +15%" in layout.reason
    assert {(r["threads"], r["instances"]) for r in table} == {(1, 1), (2, 1)}
    assert made and all(s.closed for s in made)


def test_threads_that_sleep_between_requests_show_their_wake_up():
    """Each c=1 run comes after a pause, as a sequential client's request does: threads
    not spinning have gone to sleep and pay their wake-up, which the c=1 latency shows.
    Spinning is taken unless not spinning measures better: where spinning slows the runs
    themselves by 10%, the layout not spinning is taken."""
    for wake_s, spin_cost, spins in ((0.0004, 1.0, True), (0.0, 1.1, False)):
        clock = Clock()

        def make(threads, spinning, clock=clock, wake_s=wake_s, spin_cost=spin_cost):
            return CostedSession(clock, 0.00005, 0.003, threads=threads,
                                 speedup={1: 1.0, 2: 1.8 / (spin_cost if spinning else 1)},
                                 wake_s=0.0 if spinning else wake_s)

        layout, table = measure_layouts(make, Want(cores=2, max_batch_size=8, instances=1),
                                        clock=clock, pause=clock.sleep)
        assert (layout.threads, layout.spinning) == (2, spins)
        measured = {(r["threads"], r["spinning"]): r["latency_s"] for r in table}
        run_s = (0.00005 + 0.003) / 1.8
        assert measured[(2, False)] == pytest.approx(run_s + wake_s)
        assert measured[(2, True)] == pytest.approx(run_s * spin_cost)


def test_what_is_fixed_everywhere_is_not_measured():
    layout, table = measure_layouts(lambda t, s: pytest.fail("nothing to measure"),
                                    Want(cores=4, max_batch_size=8, threads=1, instances=2,
                                         spinning=False, preferred_batch=0))
    assert (layout.threads, layout.instances, layout.preferred_batch, layout.source) == (
        1, 2, None, "fixed")
    assert table == []


def test_the_layout_is_cached_per_cores_and_what_is_fixed(tmp_path):
    clock = Clock()
    made: list = []
    make = _costed_engine(clock, {1: 1.0, 2: 1.8}, made)
    want = Want(cores=2, max_batch_size=8, instances=1, spinning=False)
    path = tuning.layout_path(tmp_path, "key", want)
    first = resolve_layout(make, want, path, clock=clock)
    record = json.loads(path.read_text())
    assert record["layout"]["threads"] == 2 and record["measured"]
    assert record["rule"]["latency_bound"] == tuning.LATENCY_BOUND
    made.clear()
    again = resolve_layout(make, want, path, clock=clock)
    assert made == [] and again.source == "cached"  # nothing run
    assert (again.threads, again.instances, again.preferred_batch) == (
        first.threads, first.instances, first.preferred_batch)
    # Other cores, or another thing fixed: another file, measured anew.
    other = Want(cores=4, max_batch_size=8, instances=1, spinning=False)
    assert tuning.layout_path(tmp_path, "key", other) != path
    # A file of another format or broken: measured again.
    path.write_text("{not json")
    assert read_cached(path) is None
    resolve_layout(make, want, path, clock=clock)
    assert made and read_cached(path) is not None


def test_a_failed_write_leaves_no_file_and_the_layout_still_serves(tmp_path, monkeypatch):
    """A full disk (or a process killed while measuring): nothing half-written; the next
    start measures again."""
    clock = Clock()
    want = Want(cores=2, max_batch_size=8, instances=1, spinning=False)
    path = tuning.layout_path(tmp_path, "key", want)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuning, "atomic_write_bytes", full_disk)
    layout = resolve_layout(_costed_engine(clock, {2: 1.8}, []), want, path, clock=clock)
    assert layout.source == "measured" and not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_a_fixed_shape_measures_no_batch():
    """An input whose non-batch dims are open gives no batch to measure with: only the
    threads are measured, and no batch size is preferred."""
    clock = Clock()
    made: list = []

    def make(threads, spinning):
        s = CostedSession(clock, 0.0005, 0.003, threads=threads, speedup={2: 1.8},
                          shape=(3, -1))
        made.append(s)
        return s

    assert not tuning.tunable(make(1, False))
    layout, _ = measure_layouts(make, Want(cores=2, max_batch_size=8, instances=1,
                                           spinning=False), clock=clock)
    assert layout.threads == 2 and layout.preferred_batch is None
    assert all(max(s.calls, default=1) == 1 for s in made)  # never a batch of more


def test_a_model_quicker_than_a_thread_hand_off_takes_the_fewest_cores():
    """It runs on the event loop itself: more threads or instances would only add
    wake-ups, so only its batch size is measured, on one thread."""
    clock = Clock()
    made: list = []

    def make(threads, spinning):
        s = CostedSession(clock, per_call_s=0.00001, per_row_s=0.000001, threads=threads,
                          speedup={2: 1.5})
        made.append(s)
        return s

    layout, table = measure_layouts(make, Want(cores=4, max_batch_size=32), clock=clock)
    assert (layout.threads, layout.instances, layout.spinning) == (1, 1, False)
    assert layout.preferred_batch == 32  # the per-call cost dominates: batches pay
    assert len(table) == 1 and "event loop" in layout.reason
