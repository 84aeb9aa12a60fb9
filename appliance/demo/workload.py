"""A closed-loop client workload: C requests in flight, each sent as the last returns.

Used by `outpost demo` and the benchmarks (their blocking loop is in benchmarks/);
figures are medians and percentiles of the requests' own round trips.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from appliance.client import AsyncClient
from appliance.errors import OutpostError


@dataclass
class LoadResult:
    model: str
    concurrency: int
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else 0.0

    def line(self) -> str:
        errs = sum(self.errors.values())
        return (f"{self.model:9} c={self.concurrency:<3} {self.throughput:9.0f} req/s  "
                f"p50 {self.percentile_ms(50):7.2f} ms  p99 {self.percentile_ms(99):7.2f} ms  "
                f"({self.requests} ok, {errs} failed)")


CLOCK = time.perf_counter  # uvloop's loop.time() only has millisecond resolution


class MeasureWindow:
    """When a run measures, and how it counts: requests by the time they started, from
    the end of the warm-up to the end of the run, and the throughput over that window.
    Up to the last answer instead, the drain of the requests still in flight at its end
    would count too: a latency, about 250 ms for the demo CNN at c=64, which put a 3 s
    run's throughput some 7% low."""

    __slots__ = ("result", "measure_from", "stop_at")

    def __init__(self, result: LoadResult, duration_s: float, warmup_s: float):
        self.result = result
        self.measure_from = CLOCK() + warmup_s
        self.stop_at = self.measure_from + duration_s

    def answered(self, t0: float, t1: float) -> None:
        if t0 >= self.measure_from:
            self.result.requests += 1
            self.result.latencies_s.append(t1 - t0)

    def failed(self, t0: float, code: str) -> None:
        if t0 >= self.measure_from:
            errors = self.result.errors
            errors[code] = errors.get(code, 0) + 1

    def close(self) -> LoadResult:
        self.result.elapsed_s = max(1e-9, min(CLOCK(), self.stop_at) - self.measure_from)
        return self.result


async def closed_loop(model: str, inputs: dict[str, np.ndarray], concurrency: int,
                      duration_s: float, *, path=None, tcp=None, token=None,
                      connections: int | None = None, warmup_s: float = 0.2) -> LoadResult:
    """Drive ``model`` with ``concurrency`` requests in flight for ``duration_s`` seconds."""
    connections = connections or min(concurrency, 8)
    clients = [await AsyncClient.connect(path, tcp=tcp, token=token)
               for _ in range(connections)]
    window = MeasureWindow(LoadResult(model, concurrency), duration_s, warmup_s)

    async def worker(client: AsyncClient) -> None:
        while True:
            t0 = CLOCK()
            if t0 >= window.stop_at:
                return
            try:
                await client.infer(model, inputs)
            except OutpostError as exc:
                window.failed(t0, exc.code)
                continue
            window.answered(t0, CLOCK())

    try:
        await asyncio.gather(*(worker(clients[i % connections]) for i in range(concurrency)))
    finally:
        for c in clients:
            await c.close()
    return window.close()


def run_closed_loop(*args, **kwargs) -> LoadResult:
    return asyncio.run(closed_loop(*args, **kwargs))
