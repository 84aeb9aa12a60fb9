"""The fleet store in PostgreSQL (psycopg 3), for fleets that outgrow one fleet server:
several ``outpost fleet serve --db postgresql://...`` replicas on one database and one
repository directory.

What the replicas share and how they agree:
- A report is stored in one transaction and acknowledged only after its COMMIT, so a
  replica killed at any point loses no report it answered 200 for.
- Each replica keeps its rollouts' counts in memory (rollout_tally.py) and is fed the
  reports the others stored (``others_reports``): every report row carries the id of the
  transaction that wrote it, and a replica reads the rows of transactions below the
  oldest one still running, so none is skipped whatever order they commit in.
- Rollout decisions (a stage advance, a halt) are checked and signed under a session
  advisory lock (``decision_lock``; fleet_decisions.py does the rest): one replica at a
  time re-reads the signed metadata, so a decision happens once.
- The database lost while serving: the call in flight raises StoreUnavailable (the server
  answers 503; devices keep their reports and send them again), nothing is half-written
  (each write is one transaction), and a background thread reconnects; until then every
  call fails at once without waiting on the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
from psycopg import conninfo

from updater.errors import FleetStoreError, StoreUnavailable
from updater.fleet_db import INSERT_DECISION, LATER_COLUMNS, FleetStore

log = logging.getLogger("outpost.fleet")

# Advisory lock keys of this application ("outp" and a number): the schema's creation,
# and the decision lock every replica takes to check and sign a rollout decision.
SCHEMA_LOCK = 0x6F757470_0001
DECISION_LOCK = 0x6F757470_0002
CONNECT_TIMEOUT_S = 5
RECONNECT_EVERY_S = 0.5
LOCK_TIMEOUT_S = 30
# A dead peer is noticed in ~25 s by TCP keepalive, an unacknowledged send in 10 s.
_CONNECT_OPTIONS = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "outpost-fleet",
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                    "keepalives_count": 3, "tcp_user_timeout": 10_000}

SCHEMA = (
    "create table if not exists reports (id bigserial primary key, "
    "received_at double precision not null, device_id text not null, model text not null, "
    "version bigint not null, rollout_id text not null, state text not null, "
    "detail text not null, labels text not null, device_ts double precision not null, "
    "shadow text, download text, engine text, "
    # which replica stored it, and the transaction that did (others_reports reads by it)
    "replica text not null default coalesce(current_setting('outpost.replica', true), ''), "
    "tx xid8 not null default pg_current_xact_id())",
    "create index if not exists reports_by_rollout on reports (rollout_id, device_id)",
    "create index if not exists reports_by_tx on reports (tx)",
    "create index if not exists reports_by_received on reports (received_at)",
    "create table if not exists device_state (device_id text not null, "
    "rollout_id text not null, model text not null, version bigint not null, "
    "state text not null, detail text not null, labels text not null, "
    "updated_at double precision not null, shadow text, download text, engine text, "
    "primary key (device_id, rollout_id))",
    # a database from before the download and engine columns
    *(f"alter table {table} add column if not exists {column} text"
      for table, column in LATER_COLUMNS),
    "create index if not exists state_by_rollout on device_state (rollout_id)",
    "create table if not exists devices (device_id text primary key, labels text not null, "
    "last_seen double precision not null, model text not null, version bigint not null, "
    "rollout_id text not null, state text not null, detail text not null, "
    "device_ts double precision not null)",
    "create index if not exists devices_by_last_seen on devices (last_seen)",
    "create table if not exists plan_progress (rollout_id text primary key, "
    "fraction double precision not null, met_since double precision not null)",
    "create table if not exists decisions (id bigserial primary key, "
    "decided_at double precision not null, replica text not null, model text not null, "
    "version bigint not null, rollout_id text not null, action text not null, "
    "base_version bigint not null, from_fraction double precision not null, "
    "to_fraction double precision, why text not null, figures text not null, "
    "status text not null, targets_version bigint, finished_at double precision, "
    # a decision judged on the same signed metadata can be logged once, whoever judged it
    "unique (rollout_id, action, base_version))",
)


def where(url: str) -> str:
    """The database a URL names, for messages: user@host:port/dbname, never a password."""
    try:
        p = conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "the --db URL"
    host = p.get("host") or "localhost"
    port = f":{p['port']}" if p.get("port") else ""
    user = f"{p['user']}@" if p.get("user") else ""
    return f"postgresql://{user}{host}{port}/{p.get('dbname', '')}"


def _reason(exc: BaseException) -> str:
    """libpq's message in one line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:400]


class PostgresFleetDB(FleetStore):
    shared = True

    def __init__(self, url: str, replica: str | None = None):
        self.url = url
        self.where = where(url)
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._state = threading.Lock()  # guards _conn and _reconnecting
        self._closed = False
        self._reconnecting = False
        try:
            self._conn: psycopg.Connection | None = self._connect()
        except psycopg.Error as exc:
            raise FleetStoreError(
                f"can't reach PostgreSQL at {self.where}: {_reason(exc)}; check --db (or "
                f"OUTPOST_FLEET_DB) and that the server runs and takes connections from "
                f"here") from exc
        try:
            with self._conn.transaction():
                self._conn.execute("select pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                for statement in SCHEMA:
                    self._conn.execute(statement)
            self._cursor = self._horizon(self._conn)
        except psycopg.Error as exc:
            self._conn.close()
            raise FleetStoreError(f"PostgreSQL at {self.where} refused the fleet's tables: "
                                  f"{_reason(exc)}; the --db user needs to create tables "
                                  f"in that database") from exc

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True, **_CONNECT_OPTIONS)
        conn.execute("select set_config('outpost.replica', %s, false)", [self.replica])
        # a replica stuck holding the decision lock (or a row) holds up the others only
        # this long: their call fails as unavailable, and is tried again
        conn.execute(f"set lock_timeout = '{LOCK_TIMEOUT_S}s'")
        return conn

    def close(self) -> None:
        with self._state:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- one call on the connection, or StoreUnavailable -----------------------------------------

    def _use(self, fn: Callable[[psycopg.Connection], object]):
        conn = self._conn
        if conn is None:
            self._start_reconnecting()
            raise StoreUnavailable(f"PostgreSQL at {self.where} is unreachable; reconnecting "
                                   f"(devices keep their reports and send them again)")
        try:
            return fn(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if conn.broken or conn.closed:
                self._lost(conn, exc)
            raise StoreUnavailable(f"PostgreSQL at {self.where}: {_reason(exc)}; nothing of "
                                   f"this request was stored") from exc

    def _lost(self, conn: psycopg.Connection, exc: BaseException) -> None:
        with self._state:
            if self._conn is conn:
                self._conn = None
                log.error("PostgreSQL at %s lost: %s; reports are answered 503 until it is "
                          "back", self.where, _reason(exc))
        with contextlib.suppress(psycopg.Error):
            conn.close()
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        with self._state:
            if self._reconnecting or self._closed or self._conn is not None:
                return
            self._reconnecting = True
        threading.Thread(target=self._reconnect, name="pg-reconnect", daemon=True).start()

    def _reconnect(self) -> None:
        """Off the event loop: try until the database answers, then hand the connection
        over (a connect that hangs on the network never holds a request)."""
        while not self._closed:
            try:
                conn = self._connect()
            except psycopg.Error:
                time.sleep(RECONNECT_EVERY_S)
                continue
            with self._state:
                self._reconnecting = False
                if self._closed:
                    conn.close()
                    return
                self._conn = conn
            log.warning("PostgreSQL at %s is back: reports are taken again", self.where)
            return

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # -- FleetStore ----------------------------------------------------------------------------

    def _rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        return self._use(lambda conn: conn.execute(sql.replace("?", "%s"), params).fetchall())

    def _write(self, statements: list[tuple[str, list[tuple]]]) -> None:
        def write(conn: psycopg.Connection) -> None:
            # statement by statement (prepared by psycopg after a few runs): a handful a
            # POST; executemany's pipeline costs more CPU than it saves here
            with conn.transaction(), conn.cursor() as cur:
                for sql, rows in statements:
                    for row in rows:
                        cur.execute(sql.replace("?", "%s"), row)
        self._use(write)

    @contextlib.contextmanager
    def decision_lock(self) -> Iterator[None]:
        """A session advisory lock: one replica at a time checks and signs a decision. A
        replica that dies holding it loses its session, and with it the lock."""
        self._use(lambda conn: conn.execute("select pg_advisory_lock(%s)", [DECISION_LOCK]))
        try:
            yield
        finally:
            with contextlib.suppress(StoreUnavailable):
                self._use(lambda conn: conn.execute("select pg_advisory_unlock(%s)",
                                                    [DECISION_LOCK]))

    def log_decision(self, d: dict) -> int | None:
        row = self._use(lambda conn: conn.execute(
            INSERT_DECISION.replace("?", "%s") + " returning id",
            self.decision_params(d)).fetchone())
        return row[0] if row else None

    def reports_by_minute(self, start: float, end: float) -> list[tuple[int, str, int]]:
        return self._rows(
            "select floor((received_at - ?) / 60)::integer as m, state, count(*) from "
            "reports where received_at >= ? and received_at < ? group by m, state",
            [start, start, end])

    @staticmethod
    def _horizon(conn: psycopg.Connection) -> str:
        """The oldest transaction still running: every one below it has ended."""
        return conn.execute("select pg_snapshot_xmin(pg_current_snapshot())::text"
                            ).fetchone()[0]

    def others_reports(self) -> list[dict]:
        """Reports the other replicas stored since the last call. The horizon is read
        first: every transaction below it has committed or aborted, so the rows read
        below it are all there will ever be; the rest come on a later call."""
        def read(conn: psycopg.Connection) -> tuple[str, list[tuple]]:
            horizon = self._horizon(conn)
            rows = conn.execute(
                "select device_id, model, version, rollout_id, state, detail, labels, "
                "device_ts, download, engine from reports where tx >= %s::xid8 and "
                "tx < %s::xid8 and replica <> %s order by id",
                [self._cursor, horizon, self.replica]
            ).fetchall()
            return horizon, rows

        horizon, rows = self._use(read)
        self._cursor = horizon
        return [{"device_id": d, "model": m, "version": v, "rollout_id": ro, "state": st,
                 "detail": de, "labels": json.loads(lb), "ts": ts,
                 "download": json.loads(dl) if dl else None, "engine": en}
                for d, m, v, ro, st, de, lb, ts, dl, en in rows]
