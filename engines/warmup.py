"""Warm-up to steady state: run a session at every batch size it will see until two
consecutive runs take about the same time.

One run is not enough: ONNX Runtime plans each input shape's memory on its first two runs
(its memory pattern), and every batch size the batcher forms is a shape of its own;
TensorRT's first run at a shape picks its tactics' buffers. Measured on a model with a
16 MiB intermediate: the first request after a one-run warm-up took 5-8x the median.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Two consecutive runs "agree" when they differ by at most this share of the slower one,
# or by SETTLE_FLOOR_S (timer and scheduler noise on a run of a few microseconds).
SETTLE_MARGIN = 0.2
SETTLE_FLOOR_S = 100e-6
MIN_RUNS = 2  # ONNX Runtime's first two runs of a shape are cold, whatever the budget


@dataclass(frozen=True)
class WarmStep:
    """What warming one batch size took: runs, the last run's time, whether it settled."""

    batch_size: int
    runs: int
    last_ms: float
    settled: bool

    def as_dict(self) -> dict:
        return {"batch": self.batch_size, "runs": self.runs,
                "last_ms": round(self.last_ms, 3), "settled": self.settled}


def agree(a_s: float, b_s: float, margin: float = SETTLE_MARGIN) -> bool:
    return abs(a_s - b_s) <= max(margin * max(a_s, b_s), SETTLE_FLOOR_S)


def warm_to_steady(run_once: Callable[[int], object], batch_sizes: Iterable[int], *,
                   budget_s: float, margin: float = SETTLE_MARGIN,
                   clock: Callable[[], float] = time.perf_counter) -> list[WarmStep]:
    """Run ``run_once(n)`` for each batch size (largest first: the arena grows once)
    until two consecutive runs after the first agree within ``margin`` (at least three
    runs). Past ``budget_s`` (all sizes together) each size still gets MIN_RUNS runs, and
    is reported not settled."""
    deadline = clock() + budget_s
    steps = []
    for n in sorted(set(batch_sizes), reverse=True):
        runs, before, settled = 0, None, False
        while True:
            t0 = clock()
            run_once(n)
            took = clock() - t0
            runs += 1
            # the first two runs of a shape are both cold, and may well agree with
            # each other (measured: 78 and 83 ms, then 10.8): only later pairs count
            if runs > MIN_RUNS and agree(before, took, margin):
                settled = True
                break
            before = took
            if runs >= MIN_RUNS and clock() >= deadline:
                break
        steps.append(WarmStep(n, runs, took * 1e3, settled))
    return steps
