"""Model control: load a model's active version from the repository, or unload it.

``ModelControl.load`` and ``ModelControl.unload`` are the only places the HTTP side
changes what is loaded; they go through the service's admin ops (``Service.load``,
``Service.unload``), the same the socket offers, so the version lifecycle (hot swap,
memory budget) stays in ``ModelManager``. Unload also takes the model out of routing, as
Triton's explicit model control does: until it is loaded again its requests get
NOT_FOUND instead of loading it back lazily.
"""

from __future__ import annotations

import logging

from appliance.models import VersionState
from appliance.service import Service

log = logging.getLogger("outpost.control")

# Version state -> the state Triton's repository index reports.
INDEX_STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.UNLOADED: "UNAVAILABLE",
    VersionState.FAILED: "UNAVAILABLE",
}


class ModelControl:
    def __init__(self, service: Service):
        self.service = service
        self.manager = service.manager

    async def load(self, name: str) -> None:
        """Serve the repository's active version of ``name``; READY when this returns."""
        await self.service.load({"model": name})  # NOT_FOUND, FAILED_PRECONDITION
        log.info("model loaded on request", extra={"model": name})

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get NOT_FOUND, queued ones still finish."""
        self.manager.repo.model(name)  # NOT_FOUND for a model not in the repository
        self.manager.active.pop(name, None)
        if any(n == name for n, _ in self.manager.loaded):
            await self.service.unload({"model": name})
        log.info("model unloaded on request", extra={"model": name})

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

