"""Reports a second the fleet server ingests with its store in SQLite and in PostgreSQL.

    python -m benchmarks.bench_fleet_store [--devices 5000] [--no-replicas]

The load is that of ``benchmarks/fleet_sim.py --ingest`` (updater/ingest_load.py): N
simulated devices each POST one signed report, 32 POSTs at a time, on a live rollout to
the whole fleet; then each POSTs again, the whole fleet known. The fleet server runs as
`outpost fleet serve` in a process of its own, once for each store:

- SQLite: DIR/fleet.db (WAL, synchronous=NORMAL: a commit does not wait on fsync);
- PostgreSQL, synchronous_commit on (its default: a commit waits for the WAL's fsync);
- PostgreSQL, synchronous_commit off (like SQLite's NORMAL: a crash of the database's
  host may lose the last commits, never the database);
- two replicas on PostgreSQL (synchronous_commit on), each POSTed half the devices.

PostgreSQL is a throwaway local cluster (updater/pg_cluster.py) with its default
settings, on the same host as the server and the load: on a small host they share its
cores. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from updater.fleet_repo import FleetRepo, init_repo  # noqa: E402
from updater.ingest_load import ServerProcess, post_all  # noqa: E402


def measure(label: str, fleet: Path, devices: list[str], db_urls: list[str | None]) -> None:
    """One fleet server a URL in ``db_urls`` (None: SQLite), the devices split among them;
    ``fleet``: a new folder for its repository."""
    init_repo(fleet)
    repo = FleetRepo(fleet)
    repo.publish_archive("identity", 2, b"not a model: the server never opens it")
    rollout = repo.set_rollout("identity", 2, new=True, fraction=1.0,
                               failure_threshold=0.5, min_reports=5)
    servers = [ServerProcess(fleet, ROOT, extra=("--db", url) if url else ()).start()
               for url in db_urls]
    share = len(devices) // len(servers)
    parts = [devices[i * share:(i + 1) * share] for i in range(len(servers))]
    try:
        for what in ("first report of each device", "again, the whole fleet known"):
            cpu0, t0 = sum(s.cpu_s() for s in servers), time.monotonic()

            async def load() -> list:
                return await asyncio.gather(*(
                    post_all(s.url, repo.report_secret(), rollout.id, part, ["committed"],
                             concurrency=32 // len(servers))
                    for s, part in zip(servers, parts)))
            done = sum(len(d) for d in asyncio.run(load()))
            wall = time.monotonic() - t0
            cpu = sum(s.cpu_s() for s in servers) - cpu0
            print(f"{label}: {what}: {done:,} reports in {wall:.1f}s = {done / wall:,.0f} "
                  f"reports/s; fleet server CPU {cpu / done * 1e3:.2f} ms a report",
                  flush=True)
    finally:
        for s in servers:
            s.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=5000)
    p.add_argument("--no-replicas", action="store_true", help="skip the two-replica run")
    args = p.parse_args()
    from updater import pg_cluster  # noqa: PLC0415

    why = pg_cluster.unavailable()
    if why is not None:
        print(f"bench_fleet_store: {why}", file=sys.stderr)
        return 1
    devices = [f"sim-{i:05d}" for i in range(args.devices)]
    work = Path(tempfile.mkdtemp(prefix="outpost-store-"))
    print(f"{args.devices:,} devices, one signed report a POST, 32 POSTs at a time")
    try:
        with pg_cluster.LocalPostgres() as pg:
            sync_on = pg.create_database("fleet_sync")
            sync_off = pg.create_database("fleet_async")
            replicas = pg.create_database("fleet_replicas")
            import psycopg  # noqa: PLC0415

            with psycopg.connect(pg.url(), autocommit=True) as conn:
                conn.execute("alter database fleet_async set synchronous_commit = off")
            measure("SQLite", work / "sqlite", devices, [None])
            measure("PostgreSQL, synchronous_commit on", work / "pg", devices, [sync_on])
            measure("PostgreSQL, synchronous_commit off", work / "pg-async", devices,
                    [sync_off])
            if not args.no_replicas:
                measure("2 replicas on PostgreSQL, synchronous_commit on", work / "replicas",
                        devices, [replicas, replicas])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
