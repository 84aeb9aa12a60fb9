"""A closed-loop client workload: C requests in flight, each sent as the last returns.

Used by `outpost demo` and the benchmarks; figures are medians and percentiles of the
requests' own round trips.
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


async def closed_loop(model: str, inputs: dict[str, np.ndarray], concurrency: int,
                      duration_s: float, *, path=None, tcp=None, token=None,
                      connections: int | None = None, warmup_s: float = 0.2) -> LoadResult:
    """Drive ``model`` with ``concurrency`` requests in flight for ``duration_s`` seconds."""
    connections = connections or min(concurrency, 8)
    clients = [await AsyncClient.connect(path, tcp=tcp, token=token)
               for _ in range(connections)]
    result = LoadResult(model, concurrency)
    clock = time.perf_counter  # uvloop's loop.time() only has millisecond resolution
    start = clock()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker(client: AsyncClient) -> None:
        while True:
            t0 = clock()
            if t0 >= stop_at:
                return
            try:
                await client.infer(model, inputs)
            except OutpostError as exc:
                if t0 >= measure_from:
                    result.errors[exc.code] = result.errors.get(exc.code, 0) + 1
                continue
            t1 = clock()
            if t0 >= measure_from:
                result.requests += 1
                result.latencies_s.append(t1 - t0)

    try:
        await asyncio.gather(*(worker(clients[i % connections]) for i in range(concurrency)))
    finally:
        for c in clients:
            await c.close()
        # Requests are counted by when they started, so the throughput is over the window
        # they started in. Up to the last answer instead, the drain of the requests still
        # in flight at its end was counted too: a latency, about 250 ms for the demo CNN
        # at c=64, which put a 3 s run's throughput some 7% low.
        result.elapsed_s = max(1e-9, min(clock(), stop_at) - measure_from)
    return result


def run_closed_loop(*args, **kwargs) -> LoadResult:
    return asyncio.run(closed_loop(*args, **kwargs))
