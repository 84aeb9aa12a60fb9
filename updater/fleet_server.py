"""`outpost fleet serve`: the repository's static files, and device reports.

Any HTTP server, object store or CDN could serve ``metadata/`` and ``targets/``; this one
also takes reports (POST /v1/reports, signed by each device: report_auth.py) and halts a
rollout on its own when the failure share among reporting cohort devices passes the
rollout's threshold, re-signing the metadata. Nothing but those two folders is served:
the keys stay private.

Every URL it does not serve gets a 4xx with a JSON body saying why ({"error": ...}), never
a 500: an overlong path (414); a query string, a segment starting with '.' ('..' too) or
a character no repository file name has (400); a folder or a missing file (404); another
method (405). A request too malformed to parse (aiohttp answers it 400 itself) is logged in
one line, without a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import re
import signal
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from updater.dashboard import add_dashboard_routes
from updater.errors import StoreUnavailable, UpdaterError
from updater.fleet_db import REPORT_STATES
from updater.fleet_decisions import Change, apply_change, settle
from updater.fleet_repo import FleetRepo
from updater.fleet_rollouts import Decision, LiveRollouts, plan_status
from updater.fleet_store import open_fleet_store
from updater.report_auth import ReportAuthError, Verifier
from updater.rollout_tally import DOWNLOAD_KINDS, ENGINE_KINDS, fleet_view

log = logging.getLogger("outpost.fleet")
MAX_REPORTS_A_POST = 1000
_STR_FIELDS = ("device_id", "model", "rollout_id", "state", "detail")
# The longest real URL path is about 150 characters (targets/releases/<model>/<sha256>.
# <version>.tar, a model name at most 128); past these, 414 before the file system is asked.
MAX_URL_PATH = 1024
MAX_SEGMENT = 255
# What repository file names are made of: model names, versions, sha256 digests, roles.
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_ROUTES = "GET /metadata/..., GET /targets/..., GET /v1/status, POST /v1/reports"


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _OneLineClientErrors(logging.Filter):
    """aiohttp logs a request it could not parse (a request line over its limit, a bad
    header, an unknown method) with a traceback, though it answers 400: one line instead.
    Errors of this server's own code keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            what = " ".join(str(exc.message or type(exc).__name__).split())[:200]
            record.msg = "refused a malformed request (%s %s): %s"
            record.args = (exc.code or 400, type(exc).__name__, what)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_http_log = logging.getLogger("outpost.fleet.http")
_http_log.addFilter(_OneLineClientErrors())


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
    engine = r.get("engine")
    if engine is not None and engine not in ENGINE_KINDS:
        raise ValueError(f"reports[{i}].engine {str(engine)[:40]!r}: one of "
                         f"{', '.join(ENGINE_KINDS)} (how the device got its engine)")
    return {**{k: r[k] for k in _STR_FIELDS}, "version": r["version"], "ts": float(ts),
            "labels": labels, "shadow": check_shadow_figures(r.get("shadow"), i),
            "download": check_download(r.get("download"), i), "engine": engine}


def check_download(got: object, i: int) -> dict | None:
    """A ``downloaded`` report's optional account of the download (agent.py): ``kind``
    delta or full, ``bytes`` downloaded, ``full_bytes`` of the release, and a delta's
    ``base_version``. Reports from before it have none."""
    if got is None:
        return None
    where = f"reports[{i}].download"
    if not isinstance(got, dict):
        raise ValueError(f"{where} must be an object: kind, bytes, full_bytes, base_version")
    unknown = set(got) - {"kind", "bytes", "full_bytes", "base_version"}
    if unknown:
        raise ValueError(f"{where} has an unknown field '{sorted(unknown)[0]}'")
    if got.get("kind") not in DOWNLOAD_KINDS:
        raise ValueError(f"{where}.kind must be one of {', '.join(DOWNLOAD_KINDS)}")
    for k in ("bytes", "full_bytes"):
        if type(got.get(k)) is not int or not 0 <= got[k] < 1 << 53:
            raise ValueError(f"{where}.{k} must be a whole number of bytes >= 0")
    base = got.get("base_version")
    if got["kind"] == "delta" and type(base) is not int:
        raise ValueError(f"{where}.base_version must be the version the delta was applied to")
    return {k: got[k] for k in ("kind", "bytes", "full_bytes")} | (
        {"base_version": base} if got["kind"] == "delta" else {})


_SHADOW_NUMBERS = ("elapsed_s", "requests", "agreed", "errors", "shed", "p50_ms", "p99_ms",
                   "live_p50_ms", "live_p99_ms", "disagreement")


def check_shadow_figures(fig: object, i: int) -> dict | None:
    """A report's optional shadow figures (updater/shadow.py ShadowFigures.as_report)."""
    if fig is None:
        return None
    where = f"reports[{i}].shadow"
    if not isinstance(fig, dict):
        raise ValueError(f"{where} must be an object of figures")
    unknown = set(fig) - {*_SHADOW_NUMBERS, "error_codes"}
    if unknown:
        raise ValueError(f"{where} has an unknown figure '{sorted(unknown)[0]}'")
    out = {}
    for k in _SHADOW_NUMBERS:
        v = fig.get(k, 0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"{where}.{k} must be a number >= 0")
        out[k] = v
    if out["disagreement"] > 1:
        raise ValueError(f"{where}.disagreement must be a share in 0..1")
    codes = fig.get("error_codes", {})
    if not isinstance(codes, dict) or len(codes) > 32 or not all(
            isinstance(k, str) and len(k) <= 64 and type(v) is int and v >= 0
            for k, v in codes.items()):
        raise ValueError(f"{where}.error_codes must map at most 32 codes to counts")
    out["error_codes"] = codes
    return out


class FleetServer:
    def __init__(self, directory: Path, timestamp_check_s: float = 60.0,
                 plan_check_s: float = 5.0, db_url: str | None = None):
        self.repo = FleetRepo(directory)
        # DIR/fleet.db, or PostgreSQL shared with other replicas (fleet_db_postgres.py)
        self.db = open_fleet_store(self.repo.dir, db_url)
        self.live = LiveRollouts(self.repo, self.db)
        self.follow_s = 0.5  # how often a replica takes in what the others stored
        self._decisions_seen = self.db.last_decision_id()
        self.timestamp_check_s = timestamp_check_s
        self.plan_check_s = plan_check_s  # how often planned rollouts are judged
        secret = self.repo.report_secret()
        # A fleet made before reports were signed has no secret: it takes them unsigned
        # until 'outpost fleet device-key' makes one (logged at start).
        self.verifier = Verifier(secret) if secret is not None else None
        self.halts: list[tuple[str, int, str, float]] = []  # (model, version, why, unix ts)
        self.on_halt = None  # called (model, version, why) after an auto-halt
        self.on_advance = None  # called (model, version, fraction, why) after a stage
        self._lock = asyncio.Lock()
        self._refresher: asyncio.Task | None = None
        self._planner: asyncio.Task | None = None
        self._follower: asyncio.Task | None = None
        self._last_word: dict[str, str] = {}  # rollout id -> the planner's last wait, logged

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20, middlewares=[self._clear_errors])
        app.router.add_post("/v1/reports", self.reports)
        app.router.add_get("/v1/status", self.status)
        for prefix, root in (("metadata", self.repo.metadata_dir),
                             ("targets", self.repo.targets_dir)):
            app.router.add_get(f"/{prefix}/{{path:.*}}",
                               functools.partial(self._file, root=root, prefix=prefix))
        # The fleet dashboard, GET only (updater/dashboard.py)
        add_dashboard_routes(app, self.live, self._lock, status_report)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app) -> None:
        if self.verifier is None:
            log.warning("device reports are not authenticated: this fleet has no "
                        "keys/report.key; 'outpost fleet device-key' makes it")
        if self.timestamp_check_s > 0:
            self._refresher = asyncio.create_task(self._refresh_timestamp())
        if self.plan_check_s > 0:
            self._planner = asyncio.create_task(self._run_plans())
        if self.db.shared:
            self._follower = asyncio.create_task(self._follow_replicas())

    async def _stop(self, _app) -> None:
        for task in (self._refresher, self._planner, self._follower):
            if task:
                task.cancel()
        self.db.close()

    async def _refresh_timestamp(self) -> None:
        """Keep the short-lived timestamp valid: re-sign it when half its life is gone."""
        half = timedelta(days=self.repo.expiry.timestamp_days / 2)
        def refresh() -> bool:  # signing is serialised with the other replicas' too
            with self.db.decision_lock():
                return self.repo.refresh_timestamp(half)

        while True:
            try:
                async with self._lock:
                    if await asyncio.to_thread(refresh):
                        log.info("timestamp re-signed")
            except Exception as exc:  # keep serving; the next round retries
                log.error("timestamp refresh failed: %s", exc)
            await asyncio.sleep(self.timestamp_check_s)

    @web.middleware
    async def _clear_errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Odd URLs and methods: a 4xx whose JSON body says what was wrong."""
        path = request.rel_url.raw_path
        if len(path) > MAX_URL_PATH:
            return _error(414, f"the URL path is {len(path)} characters; this server's "
                               f"paths are at most {MAX_URL_PATH}")
        if request.rel_url.raw_query_string:
            return _error(400, "this server takes no query string; serves: " + _ROUTES)
        try:
            return await handler(request)
        except StoreUnavailable as exc:  # the database is gone: come back later
            return _error(503, str(exc), {"Retry-After": "5"})
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 405:
                allow = exc.headers.get("Allow", "")
                return _error(405, f"{request.method} is not served on {request.path[:200]}"
                                   f"; use {allow or 'GET'}", {"Allow": allow})
            if exc.status == 404:
                return _error(404, f"no such path: {request.path[:200]}; this server "
                                   f"serves: {_ROUTES}")
            return _error(exc.status, exc.text or exc.reason)

    async def _file(self, request: web.Request, root: Path, prefix: str) -> web.StreamResponse:
        """A file of metadata/ or targets/: regular files below ``root`` only, named as
        the repository names them; no folder listings, no symlinks leading out."""
        rel = request.match_info["path"]
        parts = rel.split("/")
        if not rel or any(not p for p in parts):
            return _error(404, f"/{prefix}/{rel[:200]}: not a file; the fleet serves files "
                               f"only, by their full path")
        for part in parts:
            if len(part) > MAX_SEGMENT:
                return _error(414, f"a path segment of {len(part)} characters; file names "
                                   f"here are at most {MAX_SEGMENT}")
            if part.startswith(".") or not _SEGMENT.fullmatch(part):
                return _error(400, f"/{prefix}/{rel[:200]}: each path segment must be a "
                                   f"file or folder name of letters, digits, '.', '_' or "
                                   f"'-', not starting with '.' (so no '.' or '..')")
        path = root.joinpath(*parts)
        try:
            real = path.resolve(strict=True)
            is_file = real.is_file() and real.is_relative_to(root.resolve())
        except (OSError, RuntimeError):  # missing, a loop, a name the system refuses
            is_file = False
        if not is_file:
            kind = "a folder" if path.is_dir() else "no such file"
            return _error(404, f"/{prefix}/{rel[:200]}: {kind}; the fleet serves files only")
        return web.FileResponse(real)

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
        now = time.time()
        async with self._lock:
            self.live.refresh()
            ignored, counted = [], []
            for i, r in enumerate(reports):
                why = self.live.refusal(r, i, now)
                if why is None:
                    counted.append(r)
                else:
                    ignored.append({"report": i, "why": why})
            if counted:
                self.db.add(counted)
                self.live.take(counted)
                for decision in self.live.to_halt({r["rollout_id"] for r in counted}):
                    await self._halt(decision)
        if ignored:
            log.warning("ignored %d of %d reports from %s: %s", len(ignored), len(reports),
                        reports[0]["device_id"], ignored[0]["why"])
        return web.json_response({"accepted": len(counted), "ignored": ignored})

    async def _halt(self, d: Decision) -> None:
        rel = d.release
        rejected = self.live.tallies[rel.rollout.id].cohort["rejected_in_shadow"]
        why = d.why + (f" ({rejected} rejected it in shadow)" if rejected else "")
        signed = await asyncio.to_thread(apply_change, self.repo, self.db, Change(
            rel.model, rel.version, rel.rollout.id, "halt", rel.rollout.fraction, None, why,
            d.figures.__dict__))
        self.live.refresh(force=True)
        if signed is None:  # another replica halted it first
            return
        self.halts.append((rel.model, rel.version, why, time.time()))
        if self.on_halt is not None:
            self.on_halt(rel.model, rel.version, why)
        log.warning("rollout of %s %s halted: %s", rel.model, rel.version, why,
                    extra={"model": rel.model, "version": rel.version, "why": why,
                           "rollout": rel.rollout.id, "fraction": rel.rollout.fraction,
                           "figures": d.figures.__dict__})

    async def _run_plans(self) -> None:
        """Advance planned rollouts whose stage held its figures for the soak time."""
        while True:
            try:
                async with self._lock:
                    if await asyncio.to_thread(settle, self.repo, self.db):
                        self.live.refresh(force=True)  # a stopped replica's decision
                    await self.judge_plans(time.time())
            except StoreUnavailable:
                pass  # said once by the store; judged again when it is back
            except Exception as exc:  # keep serving; the next round retries
                log.error("planned rollouts could not be judged: %s", exc)
            await asyncio.sleep(self.plan_check_s)

    async def judge_plans(self, now: float) -> None:
        self.live.refresh()
        for rel in self.live.planned():
            rollout = rel.rollout
            word = self.live.plan_word(rel, now)
            fig = self.live.tallies[rollout.id].figures().__dict__
            facts = {"model": rel.model, "version": rel.version, "rollout": rollout.id,
                     "fraction": rollout.fraction, "figures": fig}
            if not word.advance:
                self.db.set_progress(rollout.id, rollout.fraction, word.met_since)
                if self._last_word.get(rollout.id, "").split(":")[0] != word.why.split(":")[0]:
                    log.info("rollout of %s %s at %.0f%%: %s", rel.model, rel.version,
                             rollout.fraction * 100, word.why, extra=facts)
                self._last_word[rollout.id] = word.why
                continue
            nxt = rollout.plan.next_fraction(rollout.fraction)
            signed = await asyncio.to_thread(apply_change, self.repo, self.db, Change(
                rel.model, rel.version, rollout.id, "advance", rollout.fraction, nxt,
                word.why, fig))
            self.live.refresh(force=True)
            if signed is None:  # another replica advanced (or halted) it first
                log.info("rollout of %s %s: another fleet server moved it first", rel.model,
                         rel.version, extra=facts)
                continue
            self.db.set_progress(rollout.id, nxt, None)
            self._last_word.pop(rollout.id, None)
            log.warning("rollout of %s %s advanced to %.0f%%: %s", rel.model, rel.version,
                        nxt * 100, word.why, extra={**facts, "to": nxt})
            if self.on_advance is not None:
                self.on_advance(rel.model, rel.version, nxt, word.why)

    async def _follow_replicas(self) -> None:
        """With replicas on one store: take in the reports the others stored (their
        counts move this one's tallies, and may call for a halt), and reload the metadata
        when another replica logged a decision."""
        while True:
            try:
                async with self._lock:
                    theirs = self.db.others_reports()
                    if theirs:
                        self.live.refresh()
                        self.live.take(theirs)
                        for decision in self.live.to_halt({r["rollout_id"] for r in theirs}):
                            await self._halt(decision)
                    seen = self.db.last_decision_id()
                    if seen != self._decisions_seen:
                        self._decisions_seen = seen
                        self.live.refresh(force=True)
            except StoreUnavailable:
                pass  # said once by the store; reports wait on the devices meanwhile
            except Exception as exc:  # keep serving; the next round retries
                log.error("the other replicas' reports could not be taken in: %s", exc)
            await asyncio.sleep(self.follow_s)

    async def status(self, _request: web.Request) -> web.Response:
        async with self._lock:
            self.live.refresh()
            return web.json_response(status_report(self.live))


def status_report(live: LiveRollouts) -> list[dict]:
    """Per release: its rollout, how many devices report each state, for a rollout with
    a shadow phase the devices' shadow figures aggregated (FleetDB.shadow_summary), and
    for a planned one its stage, what it waits for and when it may advance; bytes sent
    as deltas and as full files, devices waiting for a window or their app, engines
    prebuilt or built (the rollout's tally: RolloutTally.view)."""
    counts = live.db.counts()
    return [{"model": r.model, "version": r.version,
             "rollout": dataclasses.asdict(r.rollout) if r.rollout else None,
             "devices": counts.get(r.rollout.id, {}) if r.rollout else {},
             "shadow": live.db.shadow_summary(r.rollout.id)
             if r.rollout and r.rollout.shadow else None,
             "plan": plan_status(r, live) if r.rollout and r.rollout.plan else None,
             **(live.tallies[r.rollout.id].view() if r.rollout
                else fleet_view(Counter(), Counter(), Counter()))}
            for r in live.releases]


async def start_fleet_server(directory: Path, host: str = "127.0.0.1", port: int = 0,
                             timestamp_check_s: float = 60.0, plan_check_s: float = 5.0,
                             db_url: str | None = None,
                             ) -> tuple[FleetServer, web.AppRunner, int]:
    """Start on host:port (0: any free port); returns the server, its runner and port."""
    server = FleetServer(directory, timestamp_check_s, plan_check_s, db_url)
    runner = web.AppRunner(server.app(), access_log=None, logger=_http_log)
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
                     timestamp_check_s: float = 60.0, plan_check_s: float = 5.0,
                     sync_to: Path | None = None, db_url: str | None = None) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        # SIGTERM (systemd, kill) stops it as Ctrl-C does: the database closed, exit 0;
        # handled before the port opens, so one sent as soon as it answers is too.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server, runner, bound = await start_fleet_server(directory, host, port,
                                                         timestamp_check_s, plan_check_s,
                                                         db_url)
        store = getattr(server.db, "where", None)  # PostgreSQL: where, without a password
        print(f"fleet server on http://{host}:{bound}/ serving {directory}"
              + (f", its store in {store}" if store else ""), flush=True)
        syncing = None
        if sync_to is not None:  # each re-sign (a halt, a stage advance, a renewal, a
            # command beside the server) is published to the static host's folder
            from updater.fleet_sync import keep_synced  # noqa: PLC0415

            syncing = asyncio.create_task(keep_synced(directory, sync_to))
        try:
            await stop.wait()
        finally:
            if syncing is not None:
                syncing.cancel()
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
