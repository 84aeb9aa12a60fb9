"""Benchmark-only client loops, beside ``appliance.demo.workload.closed_loop``."""

from __future__ import annotations

import numpy as np

from appliance.client import Client
from appliance.demo.workload import CLOCK, LoadResult, MeasureWindow
from appliance.errors import OutpostError


def blocking_loop(model: str, inputs: dict[str, np.ndarray], duration_s: float, *,
                  path=None, busy_poll_us: int = 0, warmup_s: float = 0.2) -> LoadResult:
    """``closed_loop`` at concurrency 1 with the blocking ``Client``: what an app sending
    one request at a time sees, without an event loop's wake-ups."""
    with Client(path, busy_poll_us=busy_poll_us) as client:
        window = MeasureWindow(LoadResult(model, 1), duration_s, warmup_s)
        while True:
            t0 = CLOCK()
            if t0 >= window.stop_at:
                break
            try:
                client.infer(model, inputs)
            except OutpostError as exc:
                window.failed(t0, exc.code)
                continue
            window.answered(t0, CLOCK())
    return window.close()
