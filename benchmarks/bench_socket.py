"""Socket throughput and latency against the raw ONNX Runtime session, in one run.

    python -m benchmarks.bench_socket [--seconds 3] [--threads 1] [--loop auto]

The server is a real `outpost serve` process; the load comes from a separate client
process over the Unix socket (batch-1 requests, closed loop). The raw engine is the same
ONNX model in an in-process ONNX Runtime session with the same thread count, at its best
batch size. Printed, never asserted: medians and ratios, as the machine is shared.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.demo import BUILDERS, sample_inputs  # noqa: E402
from appliance.launcher import ServerProcess  # noqa: E402
from appliance.repository import Repository  # noqa: E402


def raw_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def raw_throughput(sess, model: str, batch: int, seconds: float) -> float:
    """Images (rows) per second of back-to-back session.run at one batch size."""
    feeds = sample_inputs(model, batch=batch)
    sess.run(None, feeds)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, feeds)
        n += batch
    return n / (time.perf_counter() - t0)


def raw_latency_us(sess, model: str, count: int = 3000) -> float:
    feeds = sample_inputs(model, batch=1)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _client(args) -> dict:
    """Runs in a separate process: the closed-loop load over the socket."""
    import asyncio

    from appliance.workload import closed_loop

    socket_path, model, concurrency, seconds, loop_kind = args
    if loop_kind != "asyncio":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    r = asyncio.run(closed_loop(model, sample_inputs(model), concurrency, seconds,
                                path=socket_path, warmup_s=0.5))
    return {"rps": r.throughput, "p50": r.percentile_ms(50), "p99": r.percentile_ms(99),
            "ok": r.requests, "failed": sum(r.errors.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, both sides")
    ap.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    ap.add_argument("--repeats", type=int, default=1,
                    help="repeat each socket measurement, report the median")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="op-bench-") as tmp_name:
        tmp = Path(tmp_name)
        files = {n: b(tmp / f"{n}.onnx") for n, b in BUILDERS.items()}
        repo = Repository(tmp / "data")
        for name, path in files.items():
            repo.add(name, path)
        repo.close()
        print(f"# outpost socket benchmark: {os.cpu_count()} CPUs, intra-op threads "
              f"{args.threads}, loop {args.loop}, {args.seconds:g} s per point")

        # Raw engine first, with nothing else running.
        cnn = raw_session(files["cnn"], args.threads)
        raw = {b: raw_throughput(cnn, "cnn", b, args.seconds) for b in (1, 4, 8, 16, 32)}
        best_b = max(raw, key=raw.get)
        print("raw onnxruntime cnn: " + ", ".join(f"b{b} {v:.0f} img/s" for b, v in
                                                  raw.items()) + f"  (best: batch {best_b})")
        ident = raw_session(files["identity"], args.threads)
        raw_ident_us = raw_latency_us(ident, "identity")
        print(f"raw onnxruntime identity batch-1 run: p50 {raw_ident_us:.1f} us")
        del cnn, ident

        server = ServerProcess(tmp / "data", tmp / "s.sock",
                               extra_args=["--threads", str(args.threads), "--loop",
                                           args.loop, "--log-level", "warning"])
        server.start()
        ctx = multiprocessing.get_context("spawn")
        rows = []
        try:
            with ctx.Pool(1) as pool:
                def measure(model: str, c: int) -> dict:
                    runs = [pool.apply(_client, ((str(server.socket_path), model, c,
                                                  args.seconds, args.loop),))
                            for _ in range(args.repeats)]
                    runs.sort(key=lambda r: r["rps"])
                    return runs[len(runs) // 2]

                print("\nmodel     conc   req/s      p50 ms   p99 ms   vs raw")
                for c in (1, 16, 64):
                    r = measure("cnn", c)
                    ratio = r["rps"] / raw[best_b]
                    rows.append(("cnn", c, r, ratio))
                    failed = f"  {r['failed']} failed" if r["failed"] else ""
                    print(f"cnn       {c:<4} {r['rps']:8.0f}  {r['p50']:8.2f} {r['p99']:8.2f}"
                          f"   {ratio:6.1%} of raw best ({raw[best_b]:.0f} img/s){failed}")
                for c in (1, 64):
                    r = measure("identity", c)
                    extra = ""
                    if c == 1:
                        extra = (f"   round trip adds {r['p50'] * 1e3 - raw_ident_us:.0f} us "
                                 f"p50 over the raw call")
                    print(f"identity  {c:<4} {r['rps']:8.0f}  {r['p50']:8.2f} {r['p99']:8.2f}"
                          f"{extra}")
                    rows.append(("identity", c, r, None))
        finally:
            code = server.stop()
        print(f"\nserver exit code {code}")
        c64 = next(r for r in rows if r[0] == "cnn" and r[1] == 64)
        i1 = next(r for r in rows if r[0] == "identity" and r[1] == 1)
        i64 = next(r for r in rows if r[0] == "identity" and r[1] == 64)
        print("targets: cnn c=64 >= 90% of raw best: "
              f"{c64[3]:.1%}; identity c=1 overhead <= 100 us: "
              f"{i1[2]['p50'] * 1e3 - raw_ident_us:.0f} us; identity c=64 >= 20000 req/s: "
              f"{i64[2]['rps']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
