"""`outpost fleet serve`: the repository's static files, and device reports.

Any HTTP server, object store or CDN could serve ``metadata/`` and ``targets/``; this one
also takes reports (POST /v1/reports, signed by each device: report_auth.py) and halts a
rollout on its own when the failure share among reporting cohort devices passes the
rollout's threshold, re-signing the metadata. Nothing but those two folders is served:
the keys stay private.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from updater.cohort import should_halt
from updater.errors import UpdaterError
from updater.fleet_db import REPORT_STATES, FleetDB
from updater.fleet_repo import FleetRepo
from updater.report_auth import ReportAuthError, Verifier

log = logging.getLogger("outpost.fleet")
MAX_REPORTS_A_POST = 1000
_STR_FIELDS = ("device_id", "model", "rollout_id", "state", "detail")


def check_report(r: object, i: int) -> dict:
    """One report map, checked field by field; raises ValueError naming the field."""
    if not isinstance(r, dict):
        raise ValueError(f"reports[{i}] must be an object")
    for k in _STR_FIELDS:
        if not isinstance(r.get(k), str) or len(r[k]) > 4096:
            raise ValueError(f"reports[{i}].{k} must be a string (at most 4096 chars)")
    if not r["device_id"] or not r["rollout_id"]:
        raise ValueError(f"reports[{i}]: device_id and rollout_id must not be empty")
    if r["state"] not in REPORT_STATES:
        raise ValueError(f"reports[{i}].state {r['state']!r}: one of {', '.join(REPORT_STATES)}")
    if type(r.get("version")) is not int:
        raise ValueError(f"reports[{i}].version must be an integer")
    ts = r.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        raise ValueError(f"reports[{i}].ts must be a number (unix seconds)")
    labels = r.get("labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError(f"reports[{i}].labels must map strings to strings")
    return {**{k: r[k] for k in _STR_FIELDS}, "version": r["version"], "ts": float(ts),
            "labels": labels}


class FleetServer:
    def __init__(self, directory: Path, timestamp_check_s: float = 60.0):
        self.repo = FleetRepo(directory)
        self.db = FleetDB(self.repo.dir / "fleet.db")
        self.timestamp_check_s = timestamp_check_s
        secret = self.repo.report_secret()
        # A fleet made before reports were signed has no secret: it takes them unsigned
        # until 'outpost fleet device-key' makes one (logged at start).
        self.verifier = Verifier(secret) if secret is not None else None
        self.halts: list[tuple[str, int, str, float]] = []  # (model, version, why, unix ts)
        self.on_halt = None  # called (model, version, why) after an auto-halt
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/v1/reports", self.reports)
        app.router.add_get("/v1/status", self.status)
        app.router.add_static("/metadata/", self.repo.metadata_dir, follow_symlinks=False)
        app.router.add_static("/targets/", self.repo.targets_dir, follow_symlinks=False)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        if self.verifier is None:
            log.warning("device reports are not authenticated: this fleet has no "
                        "keys/report.key; 'outpost fleet device-key' makes it")
        if self.timestamp_check_s > 0:
            self._refresher = asyncio.create_task(self._refresh_timestamp())

    async def _stop(self, _app) -> None:
        if self._refresher:
            self._refresher.cancel()
        self.db.close()

    async def _refresh_timestamp(self) -> None:
        """Keep the short-lived timestamp valid: re-sign it when half its life is gone."""
        half = timedelta(days=self.repo.expiry.timestamp_days / 2)
        while True:
            try:
                if await asyncio.to_thread(self.repo.refresh_timestamp, half):
                    log.info("timestamp re-signed")
            except Exception as exc:  # keep serving; the next round retries
                log.error("timestamp refresh failed: %s", exc)
            await asyncio.sleep(self.timestamp_check_s)

    async def reports(self, request: web.Request) -> web.Response:
        raw = await request.read()
        signer = None
        if self.verifier is not None:
            try:
                signer = self.verifier.verify(request.headers, raw)
            except ReportAuthError as exc:
                return web.json_response({"error": str(exc)}, status=exc.status)
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": "the body must be JSON: {\"reports\": [...]}"},
                                     status=400)
        items = body.get("reports") if isinstance(body, dict) else None
        if not isinstance(items, list) or len(items) > MAX_REPORTS_A_POST:
            return web.json_response(
                {"error": f"'reports' must be a list of at most {MAX_REPORTS_A_POST}"},
                status=400)
        try:
            reports = [check_report(r, i) for i, r in enumerate(items)]
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if signer is not None:
            other = next((r["device_id"] for r in reports if r["device_id"] != signer), None)
            if other is not None:
                return web.json_response({"error": f"a POST signed by {signer!r} carries a "
                                                   f"report of {other!r}; a device reports "
                                                   f"for itself only"}, status=403)
        async with self._lock:
            touched = self.db.add(reports)
            for rollout_id in touched:
                await self._maybe_halt(rollout_id)
        return web.json_response({"accepted": len(reports)})

    async def _maybe_halt(self, rollout_id: str) -> None:
        release = next((r for r in self.repo.releases()
                        if r.rollout is not None and r.rollout.id == rollout_id), None)
        if release is None or release.rollout.state == "halted":
            return
        rollout = release.rollout
        # Only devices the cohort formula puts in this rollout count: a report from
        # outside the cohort can't halt it.
        states = [s for dev, labels, s in self.db.states(rollout_id)
                  if rollout.includes(dev, labels)]
        if should_halt(rollout, states):
            failed = sum(s in ("failed", "rolled_back") for s in states)
            why = (f"{failed} of {sum(s in ('committed', 'failed', 'rolled_back') for s in states)}"
                   f" reporting cohort devices failed (threshold {rollout.failure_threshold})")
            await asyncio.to_thread(self.repo.set_rollout, release.model, release.version,
                                    state="halted")
            self.halts.append((release.model, release.version, why, time.time()))
            if self.on_halt is not None:
                self.on_halt(release.model, release.version, why)
            log.warning("rollout halted", extra={"model": release.model,
                                                 "version": release.version, "why": why})

    async def status(self, _request: web.Request) -> web.Response:
        return web.json_response(status_report(self.repo, self.db))


def status_report(repo: FleetRepo, db: FleetDB) -> list[dict]:
    counts = db.counts()
    return [{"model": r.model, "version": r.version,
             "rollout": dataclasses.asdict(r.rollout) if r.rollout else None,
             "devices": counts.get(r.rollout.id, {}) if r.rollout else {}}
            for r in repo.releases()]


async def start_fleet_server(directory: Path, host: str = "127.0.0.1", port: int = 0,
                             timestamp_check_s: float = 60.0,
                             ) -> tuple[FleetServer, web.AppRunner, int]:
    """Start on host:port (0: any free port); returns the server, its runner and port."""
    server = FleetServer(directory, timestamp_check_s)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UpdaterError(f"the fleet server can't listen on {host}:{port}: "
                         f"{exc.strerror or exc}; choose another --port or stop what "
                         f"holds it") from exc
    bound = runner.addresses[0][1]
    return server, runner, bound


def run_fleet_server(directory: Path, host: str, port: int,
                     timestamp_check_s: float = 60.0) -> int:
    async def main() -> None:
        _server, runner, bound = await start_fleet_server(directory, host, port,
                                                          timestamp_check_s)
        print(f"fleet server on http://{host}:{bound}/ serving {directory}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
