"""HTTP (Open Inference Protocol v2) against the raw engine and the msgpack socket, one run.

    python -m benchmarks.bench_http [--models cnn,identity] [--concurrency 1,16]
        [--seconds 3] [--repeats 3] [--perf-analyzer PATH] [--stability 50]

What a user gets: one real `outpost serve --http` process, started with no other flag,
over the demo models added with no config (each model's layout measured at its first
load), serves every client. For each model and concurrency, measured back to back:

- ``http-json``: a Python closed loop over HTTP (aiohttp) with the tensors in the JSON
  body (a zero-valued image for the CNN: 150,528 numbers), JSON outputs;
- ``http-bin``: the same with the binary tensor data extension, both ways;
- ``perf_analyzer``: Triton's own C++ load generator, over HTTP with binary tensors
  (its default), batch 1, ``concurrency`` requests in flight, where its binary runs;
- ``socket``: ``appliance.demo.workload.closed_loop`` over the msgpack Unix socket;
- ``pa-bare``: perf_analyzer as above against the thinnest aiohttp server
  (benchmarks/bare_servers.py: the raw session at its defaults called in the handler, no
  batcher, no checks): what any aiohttp server adds on this machine, outpost's floor;
- ``json-bare``: the ``http-json`` client against that same bare server, which parses the
  JSON tensors as outpost's fast path does (simdjson, one C pass an array) and writes its
  answer with orjson: the JSON floor.

The headline reference is the raw ONNX Runtime session at its own defaults, called back to
back at batch 1 in this process (benchmarks/raw.py), measured in each round before the
clients; the ratio to the socket stands beside it. Printed, never asserted: the machine is
shared, so read ratios rather than absolute figures.

perf_analyzer: the binary in ``tritonclient[all]==2.51.0`` (docs/http.md says how to
install it in its own venv). Without it, its rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.demo.models import sample_inputs  # noqa: E402
from benchmarks.bare_servers import bare_server  # noqa: E402
from benchmarks.bench_socket import layouts, start_default_server  # noqa: E402
from benchmarks.raw import default_session, run_back_to_back  # noqa: E402

PA_VENV = Path(os.environ.get("OUTPOST_PA_VENV", "/work/pa-venv"))


def find_perf_analyzer(given: str | None) -> tuple[str | None, dict]:
    """The perf_analyzer binary and the environment it needs (libcudart.so.12's folder)."""
    path = given or os.environ.get("PERF_ANALYZER") or (
        str(PA_VENV / "bin" / "perf_analyzer") if (PA_VENV / "bin" / "perf_analyzer").exists()
        else shutil.which("perf_analyzer"))
    env = dict(os.environ)
    libs = sorted(Path(path).resolve().parent.parent.glob(
        "lib/python3*/site-packages/nvidia/cuda_runtime/lib")) if path else []
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(libs[0]), *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return path, env


def perf_analyzer_command(binary: str, model: str, address: str, concurrency: int,
                          interval_ms: int, stability: int, csv_path: Path, *,
                          protocol: str = "http", shared_memory: bool = False) -> list[str]:
    """Batch 1 at a fixed concurrency; ``shared_memory``: tensors through system shared
    memory (``--shared-memory system``) instead of the request bodies."""
    cmd = [binary, "-m", model, "-u", address, "-i", protocol, "-b", "1",
           "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", str(interval_ms),
           "--stability-percentage", str(stability), "--max-trials", "8",
           "-f", str(csv_path)]
    if shared_memory:
        cmd += ["--shared-memory", "system"]
    return cmd


def run_perf_analyzer(cmd: list[str], env: dict, csv_path: Path) -> dict:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0 or not csv_path.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-2:]
        return {"error": " / ".join(tail) or f"exit {done.returncode}"}
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    return {"rps": float(row["Inferences/Second"]), "p50": float(row["p50 latency"]) / 1e3,
            "p99": float(row["p99 latency"]) / 1e3}


def request_body(model: str, binary: bool) -> tuple[bytes, dict]:
    """One infer request's body and headers: binary tensors, or JSON (zero-valued)."""
    inputs = sample_inputs(model)
    if not binary:
        body = json.dumps({"inputs": [
            {"name": n, "shape": list(a.shape), "datatype": "FP32",
             "data": [0] * a.size} for n, a in inputs.items()]}).encode()
        return body, {"Content-Type": "application/json"}
    head = json.dumps({
        "inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": a.nbytes}} for n, a in inputs.items()],
        "parameters": {"binary_data_output": True}}).encode()
    body = head + b"".join(a.tobytes() for a in inputs.values())
    return body, {"Inference-Header-Content-Length": str(len(head)),
                  "Content-Type": "application/octet-stream"}


async def http_closed_loop(url: str, model: str, concurrency: int, seconds: float,
                           binary: bool = True, warmup_s: float = 0.5) -> dict:
    """Like appliance.demo.workload.closed_loop, over HTTP (aiohttp), measured over the
    same window."""
    import aiohttp

    from appliance.demo.workload import CLOCK, LoadResult, MeasureWindow

    body, headers = request_body(model, binary)
    window = MeasureWindow(LoadResult(model, concurrency), seconds, warmup_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            while (t0 := CLOCK()) < window.stop_at:
                async with session.post(f"{url}/v2/models/{model}/infer", data=body,
                                        headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                if status == 200:
                    window.answered(t0, CLOCK())
                else:
                    window.failed(t0, f"HTTP {status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    r = window.close()
    return {"rps": r.throughput, "p50": r.percentile_ms(50), "p99": r.percentile_ms(99),
            "failed": sum(r.errors.values())}


def _python_client(args) -> dict:
    """Runs in its own process, so client and server don't share an interpreter."""
    from appliance.demo.workload import closed_loop

    kind, target, model, concurrency, seconds = args
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if kind.startswith("http-") or kind == "json-bare":
        return asyncio.run(http_closed_loop(target, model, concurrency, seconds,
                                            binary=kind == "http-bin"))
    r = asyncio.run(closed_loop(model, sample_inputs(model), concurrency, seconds,
                                path=target, warmup_s=0.5))
    return {"rps": r.throughput, "p50": r.percentile_ms(50), "p99": r.percentile_ms(99),
            "failed": sum(r.errors.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,identity")
    ap.add_argument("--concurrency", default="1,16", help="comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="per Python-client point")
    ap.add_argument("--perf-analyzer", help="path to perf_analyzer (default: "
                                            "$PERF_ANALYZER, /work/pa-venv, $PATH)")
    ap.add_argument("--stability", type=int, default=50,
                    help="perf_analyzer --stability-percentage (the machine is noisy)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; rows report the median")
    args = ap.parse_args()
    models = args.models.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    binary, pa_env = find_perf_analyzer(args.perf_analyzer)
    kinds = ("socket", "http-bin", "http-json", "json-bare",
             *(("perf_analyzer", "pa-bare") if binary else ()))

    with tempfile.TemporaryDirectory(prefix="op-bench-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        server, files = start_default_server(tmp, ["--http", "127.0.0.1:0"])
        bare = stack.enter_context(bare_server("http", {m: files[m] for m in models}))
        url = server.ready_record()["http"]
        address = url.removeprefix("http://")
        chosen = layouts(server)
        print(f"# outpost HTTP: {os.cpu_count()} CPUs, server with no flags but --http, "
              f"{args.seconds:g} s per Python point, batch-1 requests")
        for m in models:
            lay = chosen[m]
            print(f"server {m}: {lay['threads']} thread(s) x {lay['instances']} instance(s), "
                  f"spinning {lay['spinning']} ({lay['source']})")
        if binary:
            example = perf_analyzer_command(binary, models[0], address, concurrencies[0],
                                            3000, args.stability, Path("/tmp/pa.csv"))
            print("perf_analyzer: LD_LIBRARY_PATH=" + pa_env.get("LD_LIBRARY_PATH", "")
                  + " " + " ".join(example))
        else:
            print("perf_analyzer: not found (see docs/http.md); its rows are skipped")
        raw_sessions = {m: default_session(files[m]) for m in models}
        ctx = multiprocessing.get_context("spawn")
        runs: dict[tuple, list[dict]] = {}
        raws: dict[str, list[dict]] = {}
        try:
            with ctx.Pool(1) as pool:
                # Rounds interleave the raw engine and the clients, so slow drifts of a
                # shared machine hit all alike; each row reports its median round.
                for _ in range(args.repeats):
                    raw_now = {m: run_back_to_back(s, m, args.seconds)
                               for m, s in raw_sessions.items()}
                    for m in models:
                        raws.setdefault(m, []).append(raw_now[m])
                        for c in concurrencies:
                            for kind in kinds:
                                if kind in ("perf_analyzer", "pa-bare"):
                                    csv_path = tmp / f"{kind}-{m}-{c}.csv"
                                    cmd = perf_analyzer_command(
                                        binary, m, bare if kind == "pa-bare" else address,
                                        c, int(args.seconds * 1000), args.stability,
                                        csv_path)
                                    got = run_perf_analyzer(cmd, pa_env, csv_path)
                                else:
                                    target = {"socket": str(server.socket_path),
                                              "json-bare": f"http://{bare}"}.get(kind, url)
                                    got = pool.apply(_python_client,
                                                     ((kind, target, m, c, args.seconds),))
                                got["raw"] = raw_now[m]
                                runs.setdefault((m, c, kind), []).append(got)
        finally:
            code = server.stop()
        print(f"\nmedian of {args.repeats} round(s); ratios per round, then their median")
        for m in models:
            print(f"raw onnxruntime {m} at its defaults: "
                  f"{statistics.median(r['rps'] for r in raws[m]):.0f} runs/s, p50 "
                  f"{statistics.median(r['p50_ms'] for r in raws[m]):.2f} ms")
        print("model     conc  client          req/s    p50 ms   p99 ms   vs raw   vs socket")
        for m in models:
            for c in concurrencies:
                socket_rounds = runs[(m, c, "socket")]
                for kind in kinds:
                    rounds = runs[(m, c, kind)]
                    ok = [r for r in rounds if "error" not in r]
                    if not ok:
                        print(f"{m:9} {c:<5} {kind:14} failed: {rounds[-1]['error']}")
                        continue
                    r = median_round(rounds)
                    vs_raw = statistics.median(x["rps"] / x["raw"]["rps"] for x in ok)
                    vs_socket = statistics.median(
                        x["rps"] / s["rps"] for x, s in zip(rounds, socket_rounds)
                        if "error" not in x)
                    bad = f"  ({r['failed']} failed)" if r.get("failed") else ""
                    print(f"{m:9} {c:<5} {kind:14} {r['rps']:7.0f}  {r['p50']:8.2f} "
                          f"{r['p99']:8.2f}   {vs_raw:6.2f}   {vs_socket:6.2f}{bad}")
        print(f"\nserver exit code {code}")
        if "cnn" in models and 1 in concurrencies and 16 in concurrencies:
            def ratio(c, kind):
                return statistics.median(x["rps"] / x["raw"]["rps"]
                                         for x in runs[("cnn", c, kind)] if "error" not in x)
            print(f"targets (against raw ONNX Runtime at its defaults): HTTP binary cnn c=1 "
                  f">= 0.80: {ratio(1, 'http-bin'):.2f}; c=16 >= 0.85: "
                  f"{ratio(16, 'http-bin'):.2f}; HTTP JSON cnn c=1 >= 0.45: "
                  f"{ratio(1, 'http-json'):.2f}")
            print(f"the thinnest aiohttp server with the same JSON parse (json-bare), the "
                  f"same client: c=1 {ratio(1, 'json-bare'):.2f}, c=16 "
                  f"{ratio(16, 'json-bare'):.2f}")
            if binary:
                print(f"the thinnest aiohttp server over the raw session (pa-bare), the same "
                      f"client: c=1 {ratio(1, 'pa-bare'):.2f}, c=16 {ratio(16, 'pa-bare'):.2f}; "
                      f"outpost (perf_analyzer): c=1 {ratio(1, 'perf_analyzer'):.2f}, c=16 "
                      f"{ratio(16, 'perf_analyzer'):.2f}")
    return 0


def median_round(rounds: list[dict]) -> dict:
    """The round with the median throughput (an error if every round failed)."""
    ok = sorted((r for r in rounds if "error" not in r), key=lambda r: r["rps"])
    return ok[len(ok) // 2] if ok else rounds[-1]


if __name__ == "__main__":
    sys.exit(main())
