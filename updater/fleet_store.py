"""Which fleet store a ``--db`` URL names: SQLite in the fleet's folder (the default) or
PostgreSQL. Its own module: the PostgreSQL store builds on updater.fleet_db, so fleet_db
can't be the one to choose it."""

from __future__ import annotations

from pathlib import Path

from updater.errors import FleetStoreError
from updater.fleet_db import FleetDB, FleetStore


def open_fleet_store(directory: Path, url: str | None = None) -> FleetStore:
    """The store of the fleet in ``directory``: DIR/fleet.db without ``url`` (or with
    ``sqlite``), PostgreSQL for a ``postgresql://`` URL (or any libpq connection string
    starting with it). Raises FleetStoreError in one line for anything else."""
    if not url or url == "sqlite":
        return FleetDB(Path(directory) / "fleet.db")
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from updater.fleet_db_postgres import PostgresFleetDB  # noqa: PLC0415
        except ImportError as exc:
            raise FleetStoreError(
                f"--db names PostgreSQL but psycopg is not installed ({exc.name}): "
                f"pip install 'outpost-appliance[postgres]'") from exc
        return PostgresFleetDB(url)
    scheme = url.split(":", 1)[0][:40] if ":" in url else url[:40]
    raise FleetStoreError(f"--db {scheme!r}...: the fleet store is 'sqlite' (DIR/fleet.db, "
                          f"the default) or a postgresql://user@host:port/dbname URL")
