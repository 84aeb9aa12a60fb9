"""Warm-up to steady state: every batch size until two runs agree, bounded by a budget."""

from __future__ import annotations

import time

import numpy as np

from appliance.models.loaded import warm_batch_sizes
from engines.base import Session, TensorSpec
from engines.warmup import MIN_RUNS, agree


class TimedSession(Session):
    """A real Session whose runs take the times given (seconds), cycling."""

    def __init__(self, times_s: list[float], max_batch_size: int = 8):
        self.inputs = (TensorSpec("x", "float32", (-1, 4)),)
        self.outputs = (TensorSpec("y", "float32", (-1, 4)),)
        self.max_batch_size = max_batch_size
        self.times_s = times_s
        self.batches: list[int] = []

    def run(self, feeds):
        x = feeds["x"]
        self.batches.append(x.shape[0])
        time.sleep(self.times_s[(len(self.batches) - 1) % len(self.times_s)])
        return {"y": np.zeros_like(x)}


def test_each_batch_size_runs_until_two_runs_agree():
    s = TimedSession([0.05, 0.02, 0.01, 0.01, 0.01])  # cold, cold, then steady
    steps = s.warm_to_steady((1, 4, 8), budget_s=5)
    assert [st.batch_size for st in steps] == [8, 4, 1]  # largest first
    assert all(st.settled for st in steps)
    assert steps[0].runs >= 3  # the two cold runs agree with nothing
    assert set(s.batches) == {1, 4, 8}


def test_the_two_cold_runs_never_settle_it_even_when_they_agree():
    s = TimedSession([0.03, 0.03] + [0.01] * 50)  # ONNX Runtime's two cold runs, then warm
    steps = s.warm_to_steady((4,), budget_s=5)
    assert steps[0].settled and steps[0].runs >= 4  # settled on warm runs, past the two


def test_a_warm_up_that_never_settles_is_bounded_and_reported():
    s = TimedSession([0.002, 0.01])  # alternates: no two consecutive runs agree
    t0 = time.monotonic()
    steps = s.warm_to_steady((1, 2, 8), budget_s=0.1)
    assert time.monotonic() - t0 < 1.0
    assert not any(st.settled for st in steps)
    assert all(st.runs >= MIN_RUNS for st in steps)  # each size still ran its cold runs


def test_a_model_without_a_batch_dimension_warms_its_one_shape():
    s = TimedSession([0.001], max_batch_size=0)
    s.inputs = (TensorSpec("x", "float32", (3, 4)),)
    steps = s.warm_to_steady((1, 8), budget_s=1)
    assert [st.batch_size for st in steps] == [1] and s.batches[0] == 3


def test_agreement_margin():
    assert agree(0.010, 0.0115) and not agree(0.010, 0.013)
    assert agree(20e-6, 90e-6)  # below the floor, timer noise


def test_the_sizes_the_batcher_forms():
    assert warm_batch_sizes(32, (8,), 16) == (1, 8, 16, 32)
    assert warm_batch_sizes(4, (), 2) == (1, 2, 4)
    assert warm_batch_sizes(0, (), 1) == (1,)
