"""The application behind every transport: the v1 ops on maps in, maps out.

The socket server (and the HTTP side) parse bytes and call in here; nothing here knows
frames or sockets. ``infer`` answers through a callback so the socket path needs no task
or future per request. The admin ops (``activate``, ``traffic``, ``load``, ``unload``)
are coroutines: they load models.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from appliance import __version__
from appliance.batcher import InferRequest
from appliance.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutpostError,
    Unavailable,
)
from appliance.lifecycle import VersionState, decode_inputs
from appliance.models import ModelManager, cancel_request
from appliance.protocol import PROTOCOL_VERSION, encode_tensor
from appliance.traffic import TrafficPolicy

OPS = ("hello", "infer", "models", "metadata", "health", "stats")
ADMIN_OPS = ("activate", "traffic", "load", "unload")
SERVER_NAME = "outpost"


class Service:
    def __init__(self, manager: ModelManager, max_frame_bytes: int):
        self.manager = manager
        self.max_frame_bytes = max_frame_bytes
        self.draining = False
        self.started = time.time()

    # -- simple ops: map in, map out (raise OutpostError on bad input) ------------------

    def hello(self, msg: dict) -> dict:
        v = msg.get("v")
        if v != PROTOCOL_VERSION:
            raise InvalidArgument(f"hello asks for protocol v={v!r}; this server speaks "
                                  f"v={PROTOCOL_VERSION}")
        return {"v": PROTOCOL_VERSION,
                "server": {"name": SERVER_NAME, "version": __version__},
                "max_frame_bytes": self.max_frame_bytes, "ops": list(OPS + ADMIN_OPS)}

    def models(self, msg: dict) -> dict:
        out = []
        for rec in self.manager.repo.models():
            versions = []
            for v in rec.versions:
                lv = self.manager.loaded.get((rec.name, v.version))
                state = lv.state.value if lv else ("bad" if v.state == "bad" else "unloaded")
                versions.append({"version": v.version, "state": state,
                                 "engine": lv.engine_kind if lv else None})
            out.append({"name": rec.name,
                        "active_version": self.manager.active.get(rec.name,
                                                                  rec.active_version),
                        "versions": versions})
        return {"models": out}

    def metadata(self, msg: dict) -> dict:
        lv = self.manager.get(msg.get("model"), msg.get("version"), load=False)
        return {"name": lv.name, "version": lv.version,
                "inputs": [s.as_dict() for s in lv.inputs],
                "outputs": [s.as_dict() for s in lv.outputs],
                "max_batch_size": lv.max_batch_size}

    def health(self, msg: dict) -> dict:
        return {"live": True, "ready": not self.draining and self.manager.ready()}

    def stats(self, msg: dict) -> dict:
        model = msg.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidArgument("'model' must be a string")
        rows = []
        for (name, version), lv in sorted(self.manager.loaded.items()):
            if model is not None and name != model:
                continue
            rows.append({"model": name, "version": version, "state": lv.state.value,
                         "active": self.manager.active.get(name) == version,
                         "instances": getattr(lv, "instance_count", 0),
                         "preferred_batch_sizes": list(getattr(lv, "preferred_batch_sizes", ())),
                         "inflight": lv.inflight_count(), **lv.stats.snapshot()})
        if model is not None and not rows:
            raise NotFound(f"model '{model}' is not loaded here")
        traffic = {}
        for name in sorted(self.manager.active):
            if model is None or name == model:
                snap = self.manager.traffic_snapshot(name)
                if snap is not None:
                    traffic[name] = snap
        return {"models": rows, "traffic": traffic,
                "uptime_s": round(time.time() - self.started, 3), "pid": os.getpid()}

    # -- infer ---------------------------------------------------------------------------

    def infer(self, msg: dict, reply: Callable[[dict | None, OutpostError | None], None],
              tag=None) -> InferRequest:
        """Route, check and queue; ``reply(response_fields, error)`` runs on the loop later.

        Raises OutpostError for a request that can't be queued at all.
        """
        if self.draining:
            raise Unavailable("the server is shutting down; retry against its successor")
        lv, shadow = self.manager.route(msg.get("model"), msg.get("version"),
                                        msg.get("routing_key"))
        if lv.state is VersionState.FAILED:
            raise FailedPrecondition(f"{lv.error}; fix it, then load it again (the 'load' op)")
        wanted = msg.get("outputs")
        if wanted is not None:
            if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
                raise InvalidArgument("'outputs' must be a list of output names")
            unknown = [w for w in wanted if w not in lv.output_names]
            if unknown:
                raise InvalidArgument(
                    f"output '{unknown[0]}' is not an output of model '{lv.name}'; it has "
                    f"{', '.join(sorted(lv.output_names))}")
        name, version = lv.name, lv.version
        on_live = None

        def done(outputs, error) -> None:
            if error is not None:
                reply(None, error)
                return
            if on_live is not None:
                on_live(outputs)
            names = wanted if wanted is not None else outputs.keys()
            reply({"model": name, "version": version,
                   "outputs": {n: encode_tensor(outputs[n]) for n in names}}, None)

        try:
            feeds = decode_inputs(msg.get("inputs"))
            request = lv.request_from_arrays(feeds, msg.get("priority"),
                                             msg.get("timeout_ms"), done, tag)
        except OutpostError as exc:  # counted like any failure, on every transport
            lv.stats.request_failed(exc.code)
            raise
        lv.submit(request)
        if shadow is not None:
            on_live = self.manager.shadow_copy(name, shadow, feeds)
        return request

    @staticmethod
    def cancel(request: InferRequest) -> None:
        """The caller went away: drop the request if it is still queued; no reply."""
        cancel_request(request)

    # -- admin ops (coroutines) -----------------------------------------------------------

    async def activate(self, msg: dict) -> dict:
        return await self.manager.activate(msg.get("model"), msg.get("version"))

    async def traffic(self, msg: dict) -> dict:
        name = msg.get("model")
        if msg.get("clear"):
            return await self.manager.set_traffic(name, None)
        if "policy" not in msg:
            if name not in self.manager.active:
                raise NotFound(f"model '{name}' is not served here")
            policy = self.manager.traffic.get(name)
            return {"model": name, "traffic": policy.as_dict() if policy else None}
        return await self.manager.set_traffic(name, TrafficPolicy.from_dict(msg["policy"],
                                                                            str(name)))

    async def load(self, msg: dict) -> dict:
        name = msg.get("model")
        if not isinstance(name, str):
            raise InvalidArgument("'model' must be a string")
        version = msg.get("version")
        if version is None:
            record = self.manager.repo.model(name)
            if record.active_version is None:
                raise NotFound(f"model '{name}' has no active version to load")
            version = record.active_version
            self.manager.active.setdefault(name, version)
        lv = await self.manager.ensure_loaded(name, version)
        return {"model": name, "version": lv.version, "state": lv.state.value}

    async def unload(self, msg: dict) -> dict:
        name = msg.get("model")
        if not isinstance(name, str):
            raise InvalidArgument("'model' must be a string")
        return {"model": name, "unloaded": await self.manager.unload(name,
                                                                    msg.get("version"))}
