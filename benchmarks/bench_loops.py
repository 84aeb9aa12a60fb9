"""Does uvloop help the server? asyncio's loop against uvloop's, interleaved rounds.

    python -m benchmarks.bench_loops [--seconds 2] [--rounds 3]

Each round starts the real server once with each loop and drives the identity model at
concurrency 1 and 64 from a separate client process (the client's own loop stays the
same, uvloop where installed, so only the server's changes). Medians over rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.demo.launcher import ServerProcess  # noqa: E402
from appliance.demo.models import identity_model  # noqa: E402
from appliance.models.repository import Repository  # noqa: E402
from benchmarks.bench_socket import CLEAN_ENV, _client  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="op-loops-") as tmp_name:
        tmp = Path(tmp_name)
        repo = Repository(tmp / "data")
        repo.add("identity", identity_model(tmp / "identity.onnx"))
        repo.close()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            for _ in range(args.rounds):
                for loop in ("asyncio", "uvloop"):
                    server = ServerProcess(tmp / "data", tmp / "s.sock", env=CLEAN_ENV,
                                           extra_args=["--loop", loop, "--log-level",
                                                       "warning"]).start()
                    try:
                        for c in (1, 64):
                            results.setdefault((loop, c), []).append(pool.apply(
                                _client, ((str(server.socket_path), "identity", c,
                                           args.seconds, "uvloop", "async", 0),)))
                    finally:
                        server.stop()
    print(f"# server event loop, identity model, median of {args.rounds} interleaved rounds")
    for c in (1, 64):
        row = {}
        for loop in ("asyncio", "uvloop"):
            rs = results[(loop, c)]
            row[loop] = (statistics.median(r["rps"] for r in rs),
                         statistics.median(r["p50"] for r in rs))
            print(f"c={c:<3} {loop:8} {row[loop][0]:8.0f} req/s  p50 {row[loop][1]:6.3f} ms")
        print(f"c={c:<3} uvloop / asyncio throughput: {row['uvloop'][0] / row['asyncio'][0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
