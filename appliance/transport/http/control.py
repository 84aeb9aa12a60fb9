"""Model control: load a model's active version from the repository, or unload it.

``ModelControl.load`` and ``ModelControl.unload`` are the only places the HTTP side
changes what is loaded; they go through the service (``Service.load``,
``Service.unload``), as the socket's admin ops do, so the version lifecycle (hot swap,
memory budget) stays in the model manager. Unload also takes the model out of routing, as
Triton's explicit model control does: until it is loaded again its requests get
NOT_FOUND instead of loading it back lazily.
"""

from __future__ import annotations

import logging

from appliance.serving.service import Service

log = logging.getLogger("outpost.control")

# Version state -> the state Triton's repository index reports.
INDEX_STATES = {"loading": "LOADING", "ready": "READY", "unloading": "UNLOADING",
                "unloaded": "UNAVAILABLE", "failed": "UNAVAILABLE", "bad": "UNAVAILABLE"}


class ModelControl:
    def __init__(self, service: Service):
        self.service = service

    async def load(self, name: str) -> None:
        """Serve the repository's active version of ``name``; READY when this returns."""
        await self.service.load(name)  # NOT_FOUND, FAILED_PRECONDITION
        log.info("model loaded on request", extra={"model": name})

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get NOT_FOUND, queued ones still finish."""
        await self.service.unload(name, stop_serving=True)
        log.info("model unloaded on request", extra={"model": name})

    def index(self, ready_only: bool) -> list[dict]:
        """Every version in the repository with its state, as Triton's index lists them."""
        out = []
        for model in self.service.models():
            for version, ours, _engine, reason in model.versions:
                state = INDEX_STATES[ours]
                if ready_only and state != "READY":
                    continue
                entry = {"name": model.name, "version": str(version), "state": state}
                if reason:
                    entry["reason"] = reason
                out.append(entry)
        return out
