"""Updater errors, by cause. Each message says what, where, and what to do."""

from __future__ import annotations


class UpdaterError(Exception):
    """Base of every updater error; ``str()`` is one line a user can act on."""


class FleetRepoError(UpdaterError):
    """The fleet's TUF repository on disk is missing, malformed, or the request is wrong."""


class TrustError(UpdaterError):
    """Metadata or an artifact failed TUF verification (signature, expiry, version, hash)."""


class FetchError(UpdaterError):
    """The fleet could not be reached, or answered with an HTTP error."""


class ReleaseError(UpdaterError):
    """A verified release is unusable here: bad archive, failed prepare or validation."""


class HealthError(UpdaterError):
    """The new version served worse than the previous one during the health watch."""


class FleetStoreError(UpdaterError):
    """The fleet server's store (SQLite fleet.db or PostgreSQL) can't be opened or used."""


class StoreUnavailable(FleetStoreError):
    """The store was lost while serving (PostgreSQL down): reports are answered 503 and
    devices keep them until it returns."""


class SyncError(UpdaterError):
    """Publishing the repository to a static host's folder failed (``fleet sync``)."""
