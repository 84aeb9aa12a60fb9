"""The v1 socket ops as maps (DESIGN section 2, docs/protocol.md): each op's request map
turned into a service call, and the answer back into the op's response fields.

``infer_request`` decodes an infer map into the service's ``InferRequest``: tensors become
arrays over the frame's bytes and ``timeout_ms`` a deadline; every other field is passed on
for the service to check. Nothing here knows frames or connections.
"""

from __future__ import annotations

import os
import time

from appliance import __version__
from appliance.errors import InvalidArgument, OutpostError
from appliance.protocol.frames import PROTOCOL_VERSION
from appliance.protocol.tensors import decode_tensor
from appliance.serving.contract import NO_DEADLINE, InferRequest, VersionInfo
from appliance.serving.service import SERVER_NAME, Service


def infer_request(msg: dict) -> InferRequest:
    request = InferRequest(msg.get("model"), {}, msg.get("version"), msg.get("outputs"),
                           msg.get("routing_key"), msg.get("priority"))
    try:
        inputs = msg.get("inputs")
        if type(inputs) is not dict:
            raise InvalidArgument("'inputs' must be a map of input name to tensor")
        request.inputs = {k: decode_tensor(v, f"inputs.{k}") for k, v in inputs.items()}
        timeout_ms = msg.get("timeout_ms")
        if timeout_ms is not None:
            if type(timeout_ms) is not int or timeout_ms < 0:
                raise InvalidArgument(
                    f"timeout_ms {timeout_ms!r} must be a non-negative integer")
            request.deadline = (time.monotonic() + timeout_ms / 1e3 if timeout_ms
                                else NO_DEADLINE)
    except OutpostError as exc:
        # Without its traceback: it holds this frame, which holds the request (and its
        # arrays), a cycle only the cyclic collector would free.
        request.wire_error = exc.with_traceback(None)
    return request


class SocketOps:
    """The ops other than infer, by name: ``simple`` answer at once, ``admin`` are
    coroutines (they load models) answered when done."""

    INFER = "infer"

    def __init__(self, service: Service, max_frame_bytes: int):
        self.service = service
        self.max_frame_bytes = max_frame_bytes
        self.simple = {"hello": self.hello, "models": self.models, "metadata": self.metadata,
                       "health": self.health, "stats": self.stats}
        self.admin = {"activate": self.activate, "traffic": self.traffic, "load": self.load,
                      "unload": self.unload}
        self.names = ("hello", self.INFER, "models", "metadata", "health", "stats",
                      *self.admin)

    def hello(self, msg: dict) -> dict:
        v = msg.get("v")
        if v != PROTOCOL_VERSION:
            raise InvalidArgument(f"hello asks for protocol v={v!r}; this server speaks "
                                  f"v={PROTOCOL_VERSION}")
        return {"v": PROTOCOL_VERSION,
                "server": {"name": SERVER_NAME, "version": __version__},
                "max_frame_bytes": self.max_frame_bytes, "ops": list(self.names)}

    def models(self, msg: dict) -> dict:
        return {"models": [
            {"name": m.name, "active_version": m.active_version,
             "versions": [{"version": v, "state": state, "engine": engine}
                          for v, state, engine, _ in m.versions]}
            for m in self.service.models()]}

    def metadata(self, msg: dict) -> dict:
        info = self.service.describe(msg.get("model"), msg.get("version"))
        return {"name": info.name, "version": info.version,
                "inputs": [s.as_dict() for s in info.inputs],
                "outputs": [s.as_dict() for s in info.outputs],
                "max_batch_size": info.max_batch_size}

    def health(self, msg: dict) -> dict:
        return {"live": self.service.live(), "ready": self.service.ready()}

    def stats(self, msg: dict) -> dict:
        model = msg.get("model")
        rows = [_stats_row(info) for info in self.service.statistics(model)]
        return {"models": rows, "traffic": self.service.traffic_figures(model),
                "uptime_s": round(time.time() - self.service.started, 3), "pid": os.getpid()}

    async def activate(self, msg: dict) -> dict:
        return await self.service.activate(msg.get("model"), msg.get("version"))

    async def traffic(self, msg: dict) -> dict:
        name = msg.get("model")
        change = {k: msg[k] for k in ("policy", "clear") if k in msg}
        return {"model": name, "traffic": await self.service.traffic(name, change or None)}

    async def load(self, msg: dict) -> dict:
        info = await self.service.load(msg.get("model"), msg.get("version"))
        return {"model": info.name, "version": info.version, "state": info.state}

    async def unload(self, msg: dict) -> dict:
        name = msg.get("model")
        return {"model": name, "unloaded": await self.service.unload(name, msg.get("version"))}


def _stats_row(info: VersionInfo) -> dict:
    return {"model": info.name, "version": info.version, "state": info.state,
            "active": info.active, "instances": info.instances,
            "preferred_batch_sizes": list(info.preferred_batch_sizes),
            "inflight": info.inflight, "layout": info.layout, **info.stats.snapshot()}
