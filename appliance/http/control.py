"""Model control: load a model's active version from the repository, or unload it.

``ModelControl.load`` and ``ModelControl.unload`` are the only places that change what is
loaded on behalf of a caller; the HTTP repository extension (routes.py) calls them. They
go through ``ModelManager`` (``load_version``, ``active``, ``LoadedVersion.unload``), so
they can be re-pointed at the manager's own activate/deactivate once it has them. One
lock per model keeps two callers from loading or unloading the same model at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from appliance.errors import FailedPrecondition, NotFound
from appliance.models import LoadedVersion, ModelManager, VersionState

log = logging.getLogger("outpost.control")

# LoadedVersion state -> the state Triton's repository index reports.
INDEX_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.UNLOADED: "UNAVAILABLE",
    VersionState.FAILED: "UNAVAILABLE",
}


class ModelControl:
    def __init__(self, manager: ModelManager):
        self.manager = manager
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def load(self, name: str) -> LoadedVersion:
        """Serve the repository's active version of ``name``; replaces an older one."""
        manager = self.manager
        async with self._locks[name]:
            record = manager.repo.model(name)  # NOT_FOUND for a model not in the repository
            version = record.active_version
            if version is None:
                raise FailedPrecondition(
                    f"model '{name}' has no active version in the repository; add one with "
                    f"'outpost models add'")
            current = manager.loaded.get((name, version))
            if current is not None and current.state is VersionState.READY:
                manager.active[name] = version
                return current
            previous = manager.active.get(name)
            vrec = next(v for v in record.versions if v.version == version)
            if current is not None:  # an earlier attempt failed: try afresh
                del manager.loaded[(name, version)]
            lv = await manager.load_version(vrec)  # FAILED_PRECONDITION when it can't load
            manager.active[name] = version
            if previous is not None and previous != version:
                await self._drop(name, previous)
            log.info("model loaded on request", extra={"model": name, "version": version})
            return lv

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get NOT_FOUND, queued ones still finish."""
        manager = self.manager
        async with self._locks[name]:
            manager.repo.model(name)  # NOT_FOUND for a model not in the repository
            manager.active.pop(name, None)
            for (n, v) in [key for key in manager.loaded if key[0] == name]:
                await self._drop(n, v)
            log.info("model unloaded on request", extra={"model": name})

    async def _drop(self, name: str, version: int) -> None:
        lv = self.manager.loaded.get((name, version))
        if lv is None:
            return
        await lv.unload()  # drains what is queued and running
        # Only forget it if nobody loaded it again meanwhile.
        if self.manager.loaded.get((name, version)) is lv:
            del self.manager.loaded[(name, version)]

    def index(self, ready_only: bool) -> list[dict]:
        """Every version in the repository with its state, as Triton's index lists them."""
        out = []
        for rec in self.manager.repo.models():
            for v in rec.versions:
                lv = self.manager.loaded.get((rec.name, v.version))
                if lv is None:
                    state, reason = "UNAVAILABLE", ("marked bad" if v.state == "bad"
                                                    else "unloaded")
                else:
                    state, reason = INDEX_STATES[lv.state], lv.error
                if ready_only and state != "READY":
                    continue
                entry = {"name": rec.name, "version": str(v.version), "state": state}
                if reason:
                    entry["reason"] = reason
                out.append(entry)
        return out


def not_loaded(name: str) -> NotFound:
    return NotFound(f"model '{name}' is not loaded; POST /v2/repository/models/{name}/load "
                    f"loads it")
