"""The fleet dashboard: its data (GET /v1/dashboard) and its page (GET /, /dashboard/FILE).

The data is what /v1/status already computes (``status_report``: each release, its
rollout, plan and shadow figures), the cohort figures the auto-halt judges (the live
tallies), and three read-only queries of the fleet's store (fleet.db or PostgreSQL:
fleet_db.py): devices per version and state, reports per minute by state over the last
hour, and devices not heard from for ``STALE_AFTER_S``. The page is package data
(dashboard_page/: HTML, JS, CSS, no framework, nothing fetched from elsewhere) that polls
the JSON every few seconds.

Nothing here writes, and nothing names a key: report keys, the report secret and the
signing keys stay under keys/, which no route of the fleet server reads.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from updater.fleet_db import FleetStore
from updater.fleet_rollouts import LiveRollouts

STALE_AFTER_S = 15 * 60  # a device that reports each state change and polls is heard often
CHART_MINUTES = 60
MAX_STALE_LISTED = 200  # the page lists the longest silent; the count covers them all
PAGE_DIR = Path(__file__).with_name("dashboard_page")
# The page's files by URL name; any other name under /dashboard/ is a 404.
PAGE_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The page loads only its own files and its own JSON (no inline script, no other origin).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer"}


def dashboard_report(live: LiveRollouts, status: list[dict], now: float) -> dict:
    """The page's data: ``status`` is ``status_report(live)`` (what /v1/status answers)."""
    return {"generated_at": now,
            "rollouts": [rollout_view(row, live) for row in status if row["rollout"]],
            "unrolled": [{"model": row["model"], "version": row["version"]}
                         for row in status if not row["rollout"]],
            "versions": versions_by_state(live.db),
            "reports_per_minute": reports_per_minute(live.db, now),
            "stale": stale_devices(live.db, now)}


def rollout_view(row: dict, live: LiveRollouts) -> dict:
    """One rollout of the status report, with its stages and the figures the halt uses."""
    ro = row["rollout"]
    tally = live.tallies.get(ro["id"])
    fig = tally.figures().__dict__ if tally is not None else None
    plan = row["plan"]
    fractions = ro["plan"]["stages"] if ro["plan"] else [ro["fraction"]]
    reached = plan["stage"] if plan else 1
    stages = [{"number": i, "fraction": f,
               "status": "done" if i < reached else "current" if i == reached else "next"}
              for i, f in enumerate(fractions, start=1)]
    return {"model": row["model"], "version": row["version"], "rollout_id": ro["id"],
            "state": ro["state"], "fraction": ro["fraction"], "selector": ro["selector"],
            "failure_threshold": ro["failure_threshold"], "min_reports": ro["min_reports"],
            "planned": plan is not None, "stage": reached, "stages": stages,
            "min_committed": ro["plan"]["min_committed"] if ro["plan"] else None,
            "waits_for": plan["waits_for"] if plan else None,
            "may_advance_at": plan["may_advance_at"] if plan else None,
            "figures": fig,
            "failure_share": _share(fig["failed"], fig["final"]) if fig else None,
            "stage_failure_share": (_share(fig["stage_failed"], fig["stage_final"])
                                    if fig else None),
            "devices": row["devices"], "shadow": row["shadow"],
            "downloads": row["downloads"], "waiting": row["waiting"],
            "engines": row["engines"]}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def versions_by_state(db: FleetStore) -> list[dict]:
    """Devices per model version, by the state of each device's latest report."""
    out: dict[tuple[str, int], dict] = {}
    for model, version, state, n in db.versions_by_state():
        row = out.setdefault((model, version), {"model": model, "version": version,
                                                "devices": 0, "states": {}})
        row["states"][state] = n
        row["devices"] += n
    return sorted(out.values(), key=lambda r: (r["model"], -r["version"]))


def reports_per_minute(db: FleetStore, now: float, minutes: int = CHART_MINUTES) -> dict:
    """Reports the server took (its own clock: received_at) per minute and state, the
    last ``minutes`` whole minutes up to the current one, oldest first."""
    end = (math.floor(now / 60) + 1) * 60
    start = end - minutes * 60
    by_state: dict[str, list[int]] = {}
    for minute, state, n in db.reports_by_minute(start, end):
        by_state.setdefault(state, [0] * minutes)[minute] += n
    return {"start": start, "minute_s": 60, "minutes": minutes, "by_state": by_state,
            "total": sum(sum(v) for v in by_state.values())}


def _first_report_since(db: FleetStore, since: float) -> int:
    """The lowest report id received at or after ``since`` (SQLite's FleetDB finds it by
    a binary search over ids; PostgreSQL has an index on the time)."""
    return db.first_report_since(since)


def stale_devices(db: FleetStore, now: float, after_s: float = STALE_AFTER_S,
                  limit: int = MAX_STALE_LISTED) -> dict:
    """Devices the fleet has not heard from for ``after_s``: how many, and the longest
    silent ``limit`` of them (id, labels, last report, when last heard)."""
    total, count, rows = db.stale_devices(now - after_s, limit)
    listed = [{"device_id": d, "labels": json.loads(lb or "{}"), "model": m,
               "version": v, "state": st, "rollout_id": ro, "last_seen": seen}
              for d, lb, m, v, st, ro, seen in rows]
    return {"after_s": after_s, "devices": total, "count": count, "listed": listed}


def add_dashboard_routes(app: web.Application, live: LiveRollouts, lock: asyncio.Lock,
                         status: Callable[[LiveRollouts], list[dict]]) -> None:
    """GET / (the page), GET /dashboard/FILE (its script and style), GET /v1/dashboard
    (its data, built under the server's lock as /v1/status is; ``status`` is
    fleet_server.status_report, passed in so this module does not import the server).
    The page's files are read once here: a package without them fails at start."""
    files = {name: (PAGE_DIR / name).read_bytes() for name in ("index.html", *PAGE_FILES)}

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=files["index.html"], content_type="text/html",
                            charset="utf-8", headers=_PAGE_HEADERS)

    async def page_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in PAGE_FILES:
            return web.json_response(
                {"error": f"/dashboard/{name[:200]}: not a file of the dashboard; its "
                          f"files are {', '.join(sorted(PAGE_FILES))}"}, status=404)
        return web.Response(body=files[name], content_type=PAGE_FILES[name],
                            charset="utf-8", headers=_PAGE_HEADERS)

    async def data(_request: web.Request) -> web.Response:
        async with lock:
            live.refresh()
            report = dashboard_report(live, status(live), time.time())
        return web.json_response(report, headers={"Cache-Control": "no-store"})

    app.router.add_get("/", page)
    app.router.add_get("/dashboard/{name}", page_file)
    app.router.add_get("/v1/dashboard", data)
