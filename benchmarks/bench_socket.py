"""Socket throughput and latency against the raw ONNX Runtime session, in one run.

    python -m benchmarks.bench_socket [--seconds 3] [--repeats 5] [--loop auto]

What a user gets: the server is a real `outpost serve` process started with no flags on
the demo models added with no config (so each model's layout is measured at its first
load, as it would be on the user's machine); the load comes from a separate client
process over the Unix socket (batch-1 requests, closed loop): AsyncClient, and at
concurrency 1 also the blocking Client (the bare floor's c=1 client is blocking too), on
the identity model without and with its busy polling (``--client-busy-poll-us``). The
``bare`` rows are the floor: the raw session at its defaults behind the thinnest server
over a Unix socket (benchmarks/bare_servers.py: length-prefixed frames read into one
buffer, the session called in the handler, no batcher, no checks, no msgpack) and its
thinnest client, so a target below what any server over a Unix socket reaches on this
machine shows as such.

The headline reference is what the user would have without Outpost: the same ONNX model
in an in-process ONNX Runtime session at ONNX Runtime's own defaults, called back to back
at batch 1 (benchmarks/raw.py). Beside it, the same session with the threads and spinning
the server chose for the model. Each round measures both references right before the
server's points and their ratios are taken per round, so the shared machine's drift in
speed falls on both alike. Printed, never asserted: medians over rounds, and ratios.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.client import Client  # noqa: E402
from appliance.demo.launcher import ServerProcess  # noqa: E402
from appliance.demo.models import BUILDERS, sample_inputs  # noqa: E402
from appliance.models.repository import Repository  # noqa: E402
from benchmarks.bare_servers import bare_server  # noqa: E402
from benchmarks.raw import default_session, layout_session, run_back_to_back  # noqa: E402

# What the user's own machine would hand the server: nothing of a test or bench run.
CLEAN_ENV = {"OUTPOST_PROFILES_DIR": "", "OUTPOST_CONFIG": ""}


def _bare_client(args) -> dict:
    from benchmarks.bare_servers import socket_loop

    path, index, model, concurrency, seconds = args
    x = next(iter(sample_inputs(model).values()))
    return socket_loop(path, index, x, concurrency, seconds)


def _client(args) -> dict:
    """Runs in a separate process: the closed-loop load over the socket. ``client``:
    "async" (AsyncClient, ``concurrency`` in flight), or "blocking" (Client, one at a
    time, with ``busy_poll_us``)."""
    import asyncio

    from appliance.demo.workload import closed_loop
    from benchmarks.workload import blocking_loop

    socket_path, model, concurrency, seconds, loop_kind, client, busy_poll_us = args
    if client == "blocking":
        r = blocking_loop(model, sample_inputs(model), seconds, path=socket_path,
                          busy_poll_us=busy_poll_us, warmup_s=0.5)
    else:
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


def start_default_server(tmp: Path, extra_args: list[str] | None = None):
    """The demo models added with no config, served by `outpost serve` with no flags
    (``extra_args`` only for listeners); returns the server and the model files."""
    files = {n: b(tmp / f"{n}.onnx") for n, b in BUILDERS.items()}
    repo = Repository(tmp / "data")
    for name, path in files.items():
        repo.add(name, path)
    repo.close()
    server = ServerProcess(tmp / "data", tmp / "s.sock", env=CLEAN_ENV,
                           extra_args=extra_args or [])
    server.start(timeout_s=300)  # first start: each model's layout is measured
    return server, files


def layouts(server) -> dict[str, dict]:
    with Client(server.socket_path) as c:
        return {row["model"]: row["layout"] for row in c.stats()["models"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per point and reference")
    ap.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                    help="the client's event loop")
    ap.add_argument("--client-busy-poll-us", type=int, default=200,
                    help="the blocking Client's busy_poll_us in the row that sets it")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds of (references, then server points); figures are medians")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="op-bench-") as tmp_name:
        tmp = Path(tmp_name)
        server, files = start_default_server(tmp, ["--log-level", "warning"])
        chosen = layouts(server)
        print(f"# outpost socket benchmark: {os.cpu_count()} CPUs, {args.seconds:g} s per "
              f"point, server with no flags, models with no config")
        for model in ("cnn", "identity"):
            lay = chosen[model]
            print(f"server {model}: {lay['threads']} thread(s) x {lay['instances']} "
                  f"instance(s), spinning {lay['spinning']}, preferred batch "
                  f"{lay['preferred_batch']} ({lay['source']}: {lay['reason']})")
        raw = {m: {"default": default_session(files[m]),
                   "same": layout_session(files[m], chosen[m]["threads"],
                                          chosen[m]["spinning"])}
               for m in ("cnn", "identity")}
        ctx = multiprocessing.get_context("spawn")
        poll_us = args.client_busy_poll_us
        points = [("cnn", 1, "async", 0), ("cnn", 1, "blocking", 0), ("cnn", 16, "async", 0),
                  ("cnn", 64, "async", 0),
                  ("identity", 1, "blocking", 0), ("identity", 1, "blocking", poll_us),
                  ("identity", 1, "async", 0), ("identity", 64, "async", 0),
                  ("cnn", 1, "bare", 0), ("cnn", 64, "bare", 0),
                  ("identity", 1, "bare", 0), ("identity", 64, "bare", 0)]
        order = {"cnn": 0, "identity": 1}  # the bare server's model indexes
        rounds: list[dict] = []
        try:
            with ctx.Pool(1) as pool, bare_server(
                    "socket", {m: files[m] for m in order}) as bare_path:
                for _ in range(args.repeats):
                    row: dict = {"raw": {(m, kind): run_back_to_back(sess, m, args.seconds)
                                         for m, pair in raw.items()
                                         for kind, sess in pair.items()}}
                    for point in points:
                        model, c, client, busy_poll_us = point
                        if client == "bare":
                            row[point] = pool.apply(_bare_client, ((
                                bare_path, order[model], model, c, args.seconds),))
                            continue
                        row[point] = pool.apply(_client, ((
                            str(server.socket_path), model, c, args.seconds, args.loop,
                            client, busy_poll_us),))
                    rounds.append(row)
        finally:
            code = server.stop()
        report(rounds, points, poll_us, code)
    return 0


def med(values) -> float:
    return statistics.median(values)


def report(rounds: list[dict], points: list, poll_us: int, code: int) -> None:
    for m in ("cnn", "identity"):
        for kind, what in (("default", "its default threads"),
                           ("same", "the server's threads")):
            rps = med([r["raw"][(m, kind)]["rps"] for r in rounds])
            p50 = med([r["raw"][(m, kind)]["p50_ms"] for r in rounds])
            print(f"raw onnxruntime {m}, {what}: {rps:.0f} runs/s back to back, "
                  f"p50 {p50 * 1e3:.1f} us")
    print(f"\nmodel     conc  client                  req/s    p50 ms   p99 ms   "
          f"(median of {len(rounds)} rounds; ratios per round, then their median)")
    summary = {}
    for point in points:
        model, c, client, busy_poll_us = point
        label = f"{client}, poll {busy_poll_us} us" if busy_poll_us else client
        rps = med([r[point]["rps"] for r in rounds])
        p50 = med([r[point]["p50"] for r in rounds])
        p99 = med([r[point]["p99"] for r in rounds])
        failed = sum(r[point]["failed"] for r in rounds)
        if model == "cnn":
            vs_default = med([r[point]["rps"] / r["raw"][(model, "default")]["rps"]
                              for r in rounds])
            vs_same = med([r[point]["rps"] / r["raw"][(model, "same")]["rps"]
                           for r in rounds])
            p50_ratio = med([r[point]["p50"] / r["raw"][(model, "default")]["p50_ms"]
                             for r in rounds])
            summary[point] = (vs_default, p50_ratio)
            extra = (f"   {vs_default:6.1%} of raw at its defaults ({vs_same:.1%} of raw "
                     f"at the server's threads); p50 {p50_ratio:.2f}x raw's")
        elif c == 1:
            over = med([r[point]["p50"] * 1e3 - r["raw"][(model, "default")]["p50_ms"] * 1e3
                        for r in rounds])
            summary[point] = over
            extra = f"   round trip adds {over:.0f} us p50 over the raw call"
        else:
            summary[point] = rps
            extra = ""
        print(f"{model:9} {c:<4}  {label:22} {rps:8.0f}  {p50:8.2f} {p99:8.2f}{extra}"
              f"{f'  {failed} failed' if failed else ''}")
    print(f"\nserver exit code {code}")
    def at(model, c, client, poll=0):
        return summary[(model, c, client, poll)]

    print(f"targets (against raw ONNX Runtime at its defaults): cnn c=64 >= 90%: "
          f"{at('cnn', 64, 'async')[0]:.1%}; cnn c=1 p50 <= 1.15x raw p50: "
          f"{at('cnn', 1, 'async')[1]:.2f}x (AsyncClient; {at('cnn', 1, 'blocking')[1]:.2f}x "
          f"Client); identity c=1 within 60 us of raw: {at('identity', 1, 'blocking'):.0f} us "
          f"(Client; {at('identity', 1, 'blocking', poll_us):.0f} us with "
          f"busy_poll_us={poll_us}, {at('identity', 1, 'async'):.0f} us AsyncClient); "
          f"identity c=64 >= 28000 req/s: {at('identity', 64, 'async'):.0f}")
    print(f"the bare floor, the same measures: cnn c=64 {at('cnn', 64, 'bare')[0]:.1%}; cnn "
          f"c=1 p50 {at('cnn', 1, 'bare')[1]:.2f}x; identity c=1 "
          f"{at('identity', 1, 'bare'):.0f} us; identity c=64 "
          f"{at('identity', 64, 'bare'):.0f} req/s")


if __name__ == "__main__":
    sys.exit(main())
