"""Fleet simulation: one real fleet server and N device agents in one process.

    python -m benchmarks.fleet_sim [--devices 500] [--thermal-share 0.3] [--shadow]
    python -m benchmarks.fleet_sim --ingest --devices 10000 [--against CHECKOUT]
    python -m benchmarks.fleet_sim --links [--devices 100] [--slow-share 0.1]

Prints the timeline (what the operator and the fleet did, and the version counts after
each poll round) and the final counts. ``--shadow`` runs the scenario twice, today's path
(the bad release is activated; the health watch rolls it back) and then with a shadow
phase on the bad release's rollout, and prints them side by side: the live requests the
bad release answered and how many of those answers were wrong, the devices that reported
it, and when the fleet halted it. Measured, never asserted.

``--links`` (updater/sim_links.py) puts a share of the devices (10%) behind a relay that
paces their link (200 kB/s) and drops it every 300 kB (a reset and a clean close in
turn), and rolls out a release that may only activate in a maintenance window
(02:00-04:00 on a local clock that runs 10x, starting at 01:59). It runs twice, the
release published without and with ``--delta-from 1`` (a retrained head), and prints,
side by side, the bytes moved (what the devices received; the fleet's own count beside
it) and the time until every device ran it.

``--ingest`` measures the fleet server alone: it runs as `outpost fleet serve` in its own
process (that of ``--against CHECKOUT`` to compare with another version of the code), and
N simulated devices each POST one signed report (32 POSTs at a time) on a live rollout,
then each POSTs again with the whole fleet known. It prints the reports a second while
1,000, 5,000 and 10,000 devices had reported, the server's CPU seconds a report and its
RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from updater.sim import Simulation  # noqa: E402

ROWS = (("devices that installed v3", "v3_installed"),
        ("live requests v3 answered", "v3_live_answers"),
        ("  of them wrong (NaN)", "v3_bad_answers"),
        ("devices that answered wrongly", "v3_devices_bad_answers"),
        ("devices that answered with v3", "v3_took_then_left"),
        ("devices that reported it failing", "v3_devices_reported_failure"),
        ("devices that marked it bad", "v3_marked_bad"),
        ("fleet halted it after (s)", "v3_halted_at_s"),
        ("v3 rollout state", "v3_state"),
        ("final versions", "final_counts"))


def run(args, shadow: bool) -> dict:
    sim = Simulation(args.devices, thermal_share=args.thermal_share, shadow=shadow)
    try:
        return asyncio.run(sim.run())
    finally:
        if not args.keep:
            shutil.rmtree(sim.work, ignore_errors=True)


def ingest(args) -> int:
    import tempfile  # noqa: PLC0415
    import time  # noqa: PLC0415

    from updater.fleet_repo import FleetRepo, init_repo  # noqa: PLC0415
    from updater.ingest_load import ServerProcess, post_all, window_rates  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="outpost-ingest-"))  # on disk, as a fleet is
    try:
        init_repo(work / "fleet")
        repo = FleetRepo(work / "fleet")
        repo.publish_archive("identity", 2, b"not a model: the server never opens it")
        rollout = repo.set_rollout("identity", 2, new=True, fraction=1.0,
                                   failure_threshold=0.5, min_reports=5)
        source = Path(args.against).resolve() if args.against else ROOT
        server = ServerProcess(work / "fleet", source).start()
        devices = [f"sim-{i:05d}" for i in range(args.devices)]
        marks = [m for m in (1000, 5000, 10000, 20000) if m <= args.devices]
        print(f"fleet server of {source} (pid {server.proc.pid}); {args.devices} devices, "
              f"one signed report a POST, 32 POSTs at a time")
        try:
            for label, states in (("first report of each device", ["committed"]),
                                  ("again, the whole fleet known", ["committed"])):
                cpu0, t0 = server.cpu_s(), time.monotonic()
                done = asyncio.run(post_all(server.url, repo.report_secret(), rollout.id,
                                            devices, states))
                wall, cpu = time.monotonic() - t0, server.cpu_s() - cpu0
                n = len(done) * len(states)
                rates = ", ".join(f"{r:,.0f}/s at {m:,}" for m, r in
                                  window_rates(done, marks, len(states)).items())
                print(f"{label}: {n:,} reports in {wall:.1f}s = {n / wall:,.0f} reports/s "
                      f"({rates}; window of 500 POSTs); server CPU {cpu:.1f}s = "
                      f"{cpu / n * 1e3:.2f} ms a report; RSS {server.rss_mib():.0f} MiB")
            print(f"fleet server peak RSS {server.rss_mib(peak=True):.0f} MiB")
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


LINK_ROWS = (("devices (on the slow link)", lambda r: f"{r['devices']} ({r['slow_devices']})"),
             ("release / its delta (bytes)", lambda r: f"{r['release_bytes']:,} / "
              + (f"{r['delta_bytes']:,}" if r["delta_bytes"] else "-")),
             ("bytes moved", lambda r: f"{r['bytes_moved']:,}"),
             ("  over the slow links", lambda r: f"{r['bytes_slow_links']:,}"),
             ("  slow links sent, metadata too", lambda r: f"{r['slow_link_sent']:,}"),
             ("  over the others", lambda r: f"{r['bytes_fast_links']:,}"),
             ("fleet: bytes as deltas", lambda r: _fleet(r, "delta")),
             ("fleet: bytes as full files", lambda r: _fleet(r, "full")),
             ("slow-link breaks", lambda r: str(r["link_breaks"])),
             ("window opens after (s)", lambda r: str(r["window_opens_s"])),
             ("slow devices ready after (s)", lambda r: str(r["slow_ready_s"])),
             ("all devices ready after (s)", lambda r: str(r["all_ready_s"])),
             ("time to 100% (s)", lambda r: str(r["time_to_100_s"])),
             ("  local time then", lambda r: str(r["local_time_at_100"])),
             ("devices on v2", lambda r: str(r["on_v2"])))


def _fleet(r: dict, kind: str) -> str:
    d = r["fleet_downloads"]
    return "?" if d is None else f"{d[kind]['bytes']:,} ({d[kind]['devices']} devices)"


def links(args) -> int:
    from updater.sim_links import LinkScenario  # noqa: PLC0415

    results = []
    for deltas in (False, True):
        print(f"== the release {'with' if deltas else 'without'} a delta", flush=True)
        sim = LinkScenario(args.devices or 100, slow_share=args.slow_share, deltas=deltas)
        try:
            results.append(asyncio.run(sim.run()))
        finally:
            if not args.keep:
                shutil.rmtree(sim.work, ignore_errors=True)
    without, with_ = results
    print(f"\n{'':32} {'without deltas':>24} {'with deltas':>24}")
    for label, show in LINK_ROWS:
        print(f"{label:32} {show(without):>24} {show(with_):>24}")
    for r in results:
        if r["errors"]:
            print(f"update errors ({'with' if r['deltas'] else 'without'} deltas): "
                  f"{r['errors']}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=None,
                   help="simulated devices (500; --links: 100)")
    p.add_argument("--thermal-share", type=float, default=0.3)
    p.add_argument("--shadow", action="store_true",
                   help="also run the bad release with a shadow phase; compare the two")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--ingest", action="store_true",
                   help="measure the fleet server alone taking signed reports")
    p.add_argument("--against", metavar="CHECKOUT",
                   help="--ingest: run the fleet server of this checkout (compare)")
    p.add_argument("--links", action="store_true",
                   help="slow, dropping links and a maintenance window, without and with "
                        "deltas")
    p.add_argument("--slow-share", type=float, default=0.1,
                   help="--links: the share of devices on the slow link")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the timeline says what happened
    if args.links:
        return links(args)
    if args.devices is None:
        args.devices = 500
    if args.ingest:
        return ingest(args)
    if not args.shadow:
        summary = run(args, False)
        print(json.dumps(summary, indent=2))
        # The server's CPU covers the metadata and releases it served every poll too:
        # --ingest measures what reports alone cost.
        print(f"\nfleet server: {summary['reports']:,} signed reports taken, and every "
              f"poll's metadata and downloads served, in {summary['server_cpu_s']:.1f} s "
              f"of its CPU; RSS {summary['server_rss_mib']:.0f} MiB (peak "
              f"{summary['server_peak_rss_mib']:.0f})\nbad release v3 installed on "
              f"{summary['v3_installed']} of {summary['devices']} devices "
              f"({summary['v3_installed'] / summary['devices']:.2%}) before the halt; "
              f"final versions {summary['final_counts']}; wall time {summary['wall_s']:.0f} s")
        return 0
    print("== today's path: v3 activated, the health watch rolls it back")
    watch = run(args, False)
    print("\n== shadow phase: v3 shadows the active version first")
    shadow = run(args, True)
    print(f"\n{'the bad release v3':34} {'health watch':>18} {'shadow phase':>18}")
    for label, key in ROWS:
        print(f"{label:34} {str(watch[key]):>18} {str(shadow[key]):>18}")
    print("\nshadow figures over the rollout:", json.dumps(shadow["v3_shadow"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
