"""What a shadow costs live traffic: CNN p99 at c=16 with and without a shadow running.

    python -m benchmarks.bench_shadow_cost [--seconds 4] [--rounds 3] [--samples 1,0.25]

One real `outpost serve` process (no flags) serves the demo CNN as version 1 and holds the
same CNN as version 2, the candidate of a shadow phase. A separate client process runs a
closed loop over the socket (AsyncClient, 16 requests in flight, batch 1). Each round
measures, back to back so the machine's drift falls on all alike: no shadow, then version
2 as the shadow at each ``--samples`` rate (the traffic policy's shadow_sample). Beside
the live figures, the shadow's own: copies compared, shed because live traffic needed the
device (router.shed_copy), left out by the sampling rate, and failed.

The issue's target: live p99 with a shadow within 10% of live p99 without. Printed, never
asserted: per round, then medians over rounds.
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

from appliance.client import Client  # noqa: E402
from appliance.demo.launcher import ServerProcess  # noqa: E402
from appliance.demo.models import cnn_model  # noqa: E402
from appliance.models.repository import Repository  # noqa: E402
from benchmarks.bench_socket import CLEAN_ENV, _client  # noqa: E402

CONCURRENCY = 16


def start_server(tmp: Path) -> ServerProcess:
    model = cnn_model(tmp / "cnn.onnx")
    repo = Repository(tmp / "data")
    repo.add("cnn", model, version=1)
    repo.add("cnn", model, version=2, activate=False)  # the candidate: the same CNN
    repo.close()
    server = ServerProcess(tmp / "data", tmp / "s.sock", env=CLEAN_ENV)
    server.start(timeout_s=300)
    return server


def set_shadow(server: ServerProcess, sample: float | None) -> None:
    with Client(server.socket_path) as c:
        if sample is None:
            c.call("traffic", model="cnn", clear=True)
        else:
            c.call("traffic", model="cnn", policy={"shadow": 2, "shadow_sample": sample})


def shadow_figures(server: ServerProcess) -> dict:
    with Client(server.socket_path) as c:
        return (c.stats("cnn")["traffic"].get("cnn") or {}).get("shadow") or {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="per point")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", default="1,0.25",
                    help="shadow_sample rates to measure, comma separated")
    args = ap.parse_args()
    samples = [float(s) for s in args.samples.split(",")]
    points: list[float | None] = [None, *samples]
    ctx = multiprocessing.get_context("spawn")
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="outpost-shadow-") as tmp, \
            ctx.Pool(1) as pool:
        server = start_server(Path(tmp))
        try:
            print(f"CNN, c={CONCURRENCY} closed loop over the socket, {args.seconds:g}s a "
                  f"point, {args.rounds} rounds")
            for rnd in range(args.rounds):
                for sample in points:
                    set_shadow(server, sample)
                    r = pool.apply(_client, ((str(server.socket_path), "cnn", CONCURRENCY,
                                              args.seconds, "auto", "async", 0),))
                    name = "no shadow" if sample is None else f"shadow {sample:g}"
                    if sample is not None:
                        sh = shadow_figures(server)
                        r.update(compared=sh.get("compared", 0), shed=sh.get("shed", 0),
                                 sampled_out=sh.get("sampled_out", 0),
                                 dropped=sh.get("dropped", 0),
                                 errors=sum((sh.get("errors") or {}).values()),
                                 agreed=sh.get("agreed", 0))
                    rows.setdefault(name, []).append(r)
                    extra = "" if sample is None else (
                        f"  shadow: compared {r['compared']} (agreed {r['agreed']}), shed "
                        f"{r['shed']}, sampled out {r['sampled_out']}, other drops "
                        f"{r['dropped'] - r['shed']}, errors {r['errors']}")
                    print(f"round {rnd + 1} {name:>12}: {r['rps']:7.1f} req/s  p50 "
                          f"{r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  failed "
                          f"{r['failed']}{extra}", flush=True)
            set_shadow(server, None)
        finally:
            server.stop()
    base = statistics.median(r["p99"] for r in rows["no shadow"])
    print("\nmedians over rounds (live requests):")
    for name, rs in rows.items():
        p99 = statistics.median(r["p99"] for r in rs)
        line = (f"  {name:>12}: {statistics.median(r['rps'] for r in rs):7.1f} req/s  p50 "
                f"{statistics.median(r['p50'] for r in rs):6.2f} ms  p99 {p99:6.2f} ms")
        if name != "no shadow":
            line += (f"  p99 {100 * (p99 / base - 1):+5.1f}% vs no shadow (target within "
                     f"10%); copies compared {statistics.median(r['compared'] for r in rs):g}"
                     f", shed {statistics.median(r['shed'] for r in rs):g}")
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
