"""Latency while the active version is swapped, beside steady state, in one run.

    python -m benchmarks.bench_swap [--seconds 5] [--concurrency 64] [--swap-every-ms 100]

A real server serves two versions of the demo MLP; a separate client process keeps
``concurrency`` batch-1 requests in flight. First a steady-state window, then a window in
which this process swaps the active version back and forth. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.client import Client  # noqa: E402
from appliance.demo.launcher import ServerProcess  # noqa: E402
from appliance.demo.models import mlp_model, sample_inputs  # noqa: E402
from appliance.models.repository import Repository  # noqa: E402


def _client(args) -> dict:
    import asyncio

    from appliance.demo.workload import closed_loop

    socket_path, concurrency, seconds = args
    r = asyncio.run(closed_loop("mlp", sample_inputs("mlp"), concurrency, seconds,
                                path=socket_path, warmup_s=0.3))
    return {"rps": r.throughput, "p50": r.percentile_ms(50), "p99": r.percentile_ms(99),
            "ok": r.requests, "failed": dict(r.errors)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--swap-every-ms", type=float, default=100.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="op-swap-") as tmp_name:
        tmp = Path(tmp_name)
        repo = Repository(tmp / "data")
        repo.add("mlp", mlp_model(tmp / "v1.onnx", seed=11))
        repo.add("mlp", mlp_model(tmp / "v2.onnx", seed=12), activate=False)
        repo.close()
        server = ServerProcess(tmp / "data", tmp / "s.sock",
                               extra_args=["--log-level", "warning"]).start()
        ctx = multiprocessing.get_context("spawn")
        try:
            with ctx.Pool(1) as pool:
                job = (str(server.socket_path), args.concurrency, args.seconds)
                steady = pool.apply(_client, (job,))
                pending = pool.apply_async(_client, (job,))
                swaps = 0
                swap_s = []
                with Client(server.socket_path, timeout_s=60) as admin:
                    time.sleep(0.3)  # the client's warm-up
                    end = time.monotonic() + args.seconds
                    while time.monotonic() < end:
                        t0 = time.perf_counter()
                        admin.call("activate", model="mlp", version=2 if swaps % 2 == 0
                                   else 1)
                        swap_s.append(time.perf_counter() - t0)
                        swaps += 1
                        time.sleep(args.swap_every_ms / 1e3)
                during = pending.get()
        finally:
            server.stop()
    swap_s.sort()
    print(f"# swap benchmark: mlp, {args.concurrency} requests in flight, "
          f"{args.seconds:g} s per window")
    print(f"steady:      {steady['rps']:8.0f} req/s  p50 {steady['p50']:6.2f} ms  "
          f"p99 {steady['p99']:6.2f} ms  failed {steady['failed'] or 0}")
    print(f"during swap: {during['rps']:8.0f} req/s  p50 {during['p50']:6.2f} ms  "
          f"p99 {during['p99']:6.2f} ms  failed {during['failed'] or 0}")
    print(f"swaps: {swaps} (median {swap_s[len(swap_s) // 2] * 1e3:.0f} ms each, load and "
          f"warm-up included)")
    print(f"p99 during swaps / steady p99: {during['p99'] / steady['p99']:.2f}x "
          f"(target <= 2x); p50 ratio {during['p50'] / steady['p50']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
