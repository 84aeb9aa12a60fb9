"""HTTP (Open Inference Protocol v2) against the msgpack socket: one server, one run.

    python -m benchmarks.bench_http [--models identity,cnn] [--concurrency 1,8]
        [--seconds 3] [--repeats 3] [--perf-analyzer PATH] [--stability 50]

One real `outpost serve --http` process serves every client. For each model and
concurrency, measured back to back against that server:

- ``perf_analyzer``: Triton's own C++ load generator, over HTTP with binary tensors
  (its default), batch 1, ``concurrency`` requests in flight;
- ``http-py``: a Python closed loop over HTTP (aiohttp, binary tensors), so the two
  protocols are also compared through clients of the same language;
- ``socket``: ``appliance.workload.closed_loop`` over the msgpack Unix socket, the
  reference every other row is divided by.

Before the server starts, the raw ONNX Runtime session runs the same batch-1 input back
to back in this process (``raw``): the engine's own ceiling. Printed, never asserted:
the machine is shared, so read ratios rather than absolute figures.

perf_analyzer: the binary in ``tritonclient[all]==2.51.0`` (docs/http.md says how to
install it in its own venv). Without it, its rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.demo.launcher import ServerProcess  # noqa: E402
from appliance.demo.models import BUILDERS, sample_inputs  # noqa: E402
from appliance.models.repository import Repository  # noqa: E402
from benchmarks.bench_socket import raw_latency_us, raw_session  # noqa: E402

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
                          interval_ms: int, stability: int, csv_path: Path) -> list[str]:
    return [binary, "-m", model, "-u", address, "-i", "http", "-b", "1",
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-interval", str(interval_ms),
            "--stability-percentage", str(stability), "--max-trials", "8",
            "-f", str(csv_path)]


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


async def http_closed_loop(url: str, model: str, concurrency: int, seconds: float,
                           warmup_s: float = 0.5) -> dict:
    """Like appliance.workload.closed_loop, over HTTP with binary tensors (aiohttp), and
    measured over the same window."""
    import aiohttp

    from appliance.demo.workload import CLOCK, LoadResult, MeasureWindow

    inputs = sample_inputs(model)
    head = json.dumps({
        "inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": a.nbytes}} for n, a in inputs.items()],
        "parameters": {"binary_data_output": True}}).encode()
    body = head + b"".join(a.tobytes() for a in inputs.values())
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}
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
    if kind == "http-py":
        return asyncio.run(http_closed_loop(target, model, concurrency, seconds))
    r = asyncio.run(closed_loop(model, sample_inputs(model), concurrency, seconds,
                                path=target, warmup_s=0.5))
    return {"rps": r.throughput, "p50": r.percentile_ms(50), "p99": r.percentile_ms(99),
            "failed": sum(r.errors.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="identity,cnn")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="per Python-client point")
    ap.add_argument("--perf-analyzer", help="path to perf_analyzer (default: "
                                            "$PERF_ANALYZER, /work/pa-venv, $PATH)")
    ap.add_argument("--stability", type=int, default=50,
                    help="perf_analyzer --stability-percentage (the machine is noisy)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads, both sides")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; rows report the median")
    args = ap.parse_args()
    models = args.models.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    binary, pa_env = find_perf_analyzer(args.perf_analyzer)

    with tempfile.TemporaryDirectory(prefix="op-bench-") as tmp_name:
        tmp = Path(tmp_name)
        files = {n: b(tmp / f"{n}.onnx") for n, b in BUILDERS.items()}
        repo = Repository(tmp / "data")
        for name, path in files.items():
            repo.add(name, path)
        repo.close()
        print(f"# outpost HTTP vs socket: {os.cpu_count()} CPUs, intra-op threads "
              f"{args.threads}, {args.seconds:g} s per Python point, batch-1 requests")
        raw = {}
        for m in models:
            raw[m] = raw_latency_us(raw_session(files[m], args.threads), m, count=500)
            print(f"raw onnxruntime {m} batch-1 run: p50 {raw[m]:.0f} us "
                  f"({1e6 / raw[m]:.0f} runs/s on one thread)")

        server = ServerProcess(tmp / "data", tmp / "s.sock", extra_args=[
            "--http", "127.0.0.1:0", "--threads", str(args.threads), "--log-level", "info"])
        server.start()
        url = _http_url(server)
        address = url.removeprefix("http://")
        print(f"server: socket {server.socket_path}, http {url}")
        if binary:
            example = perf_analyzer_command(binary, models[0], address, concurrencies[0],
                                            3000, args.stability, Path("/tmp/pa.csv"))
            print("perf_analyzer: LD_LIBRARY_PATH=" + pa_env.get("LD_LIBRARY_PATH", "")
                  + " " + " ".join(example))
        else:
            print("perf_analyzer: not found (see docs/http.md); its rows are skipped")
        ctx = multiprocessing.get_context("spawn")
        runs: dict[tuple, list[dict]] = {}
        try:
            with ctx.Pool(1) as pool:
                # Rounds interleave the clients, so slow drifts of a shared machine hit
                # every client alike; each row reports its median round.
                for _ in range(args.repeats):
                    for m in models:
                        for c in concurrencies:
                            for kind, target in (("socket", str(server.socket_path)),
                                                 ("http-py", url)):
                                runs.setdefault((m, c, kind), []).append(pool.apply(
                                    _python_client, ((kind, target, m, c, args.seconds),)))
                            if binary:
                                csv_path = tmp / f"pa-{m}-{c}.csv"
                                cmd = perf_analyzer_command(binary, m, address, c,
                                                            int(args.seconds * 1000),
                                                            args.stability, csv_path)
                                runs.setdefault((m, c, "perf_analyzer"), []).append(
                                    run_perf_analyzer(cmd, pa_env, csv_path))
        finally:
            code = server.stop()
        print(f"\nmedian of {args.repeats} round(s)\n"
              "model     conc  client          req/s    p50 ms   p99 ms   vs socket")
        for m in models:
            for c in concurrencies:
                ref = _median(runs[(m, c, "socket")])["rps"]
                for kind in ("socket", "http-py", "perf_analyzer"):
                    if (m, c, kind) not in runs:
                        continue
                    r = _median(runs[(m, c, kind)])
                    if "error" in r:
                        print(f"{m:9} {c:<5} {kind:14} failed: {r['error']}")
                        continue
                    bad = f"  ({r['failed']} failed)" if r.get("failed") else ""
                    print(f"{m:9} {c:<5} {kind:14} {r['rps']:7.0f}  {r['p50']:8.2f} "
                          f"{r['p99']:8.2f}   {r['rps'] / ref:6.2f}x{bad}")
        print(f"\nserver exit code {code}")
    return 0


def _median(rounds: list[dict]) -> dict:
    """The round with the median throughput (an error if every round failed)."""
    ok = sorted((r for r in rounds if "error" not in r), key=lambda r: r["rps"])
    return ok[len(ok) // 2] if ok else rounds[-1]


def _http_url(server: ServerProcess) -> str:
    for line in server.log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "ready":
            return record["http"]
    raise RuntimeError(f"the server logged no HTTP address:\n{server.log_tail()}")


if __name__ == "__main__":
    sys.exit(main())
