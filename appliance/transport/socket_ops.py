"""The v1 socket ops as maps (DESIGN section 2, docs/protocol.md): each op's request map
turned into a service call, and the answer back into the op's response fields.

``infer_request`` decodes an infer map into the service's ``InferRequest``: tensors become
arrays over the frame's bytes (or views of a shared memory region) and ``timeout_ms`` a
deadline; every other field is passed on for the service to check. ``OutputRegions`` puts
outputs into the regions an infer map's ``output_shm`` names. Nothing here knows frames;
the shared memory ops take the connection that owns what it registers.
"""

from __future__ import annotations

import os
import time

from appliance import __version__
from appliance.errors import InvalidArgument, OutpostError
from appliance.protocol.frames import PROTOCOL_VERSION
from appliance.protocol.tensors import NAME_OF_DTYPE, decode_tensor, dtype_and_shape
from appliance.serving.contract import NO_DEADLINE, InferRequest, VersionInfo
from appliance.serving.service import SERVER_NAME, Service
from appliance.serving.shared_memory import SharedMemoryRegistry

SHM_OPS = ("shm_register", "shm_status", "shm_unregister")


def infer_request(msg: dict, shm: SharedMemoryRegistry | None = None) -> InferRequest:
    request = InferRequest(msg.get("model"), {}, msg.get("version"), msg.get("outputs"),
                           msg.get("routing_key"), msg.get("priority"))
    try:
        inputs = msg.get("inputs")
        if type(inputs) is not dict:
            raise InvalidArgument("'inputs' must be a map of input name to tensor")
        request.inputs = {k: decode_tensor(v, f"inputs.{k}")
                          if type(v) is not dict or "shm" not in v
                          else _region_tensor(v, f"inputs.{k}", shm)
                          for k, v in inputs.items()}
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


def _region_tensor(obj: dict, where: str, shm: SharedMemoryRegistry | None):
    """An input whose bytes are a window of a registered region: a view, no copy."""
    if "data" in obj:
        raise InvalidArgument(f"{where} has both data and shm; send one of them")
    dtype, shape = dtype_and_shape(obj, where)
    region, offset, nbytes = _window(obj["shm"], f"{where}.shm")
    if shm is None:
        raise InvalidArgument(f"{where}.shm: shared memory is not served here")
    return shm.read(region, offset, nbytes, dtype, shape, f"{where}.shm")


def _window(obj: object, where: str) -> tuple[object, object, object]:
    if type(obj) is not dict or "region" not in obj or "nbytes" not in obj:
        raise InvalidArgument(f"{where} must be a map of region, nbytes and (optional) "
                              f"offset")
    return obj["region"], obj.get("offset", 0), obj["nbytes"]


class OutputRegions:
    """An infer map's ``output_shm``: output name -> the region window it is written to.
    Checked when the request arrives (the region registered, the window inside it), so a
    bad one costs no inference."""

    __slots__ = ("windows", "shm")

    def __init__(self, msg: dict, shm: SharedMemoryRegistry):
        wanted = msg["output_shm"]
        if type(wanted) is not dict or not wanted:
            raise InvalidArgument("'output_shm' must be a map of output name to "
                                  "{region, offset, nbytes}")
        outputs = msg.get("outputs")
        self.shm = shm
        self.windows = {}
        for name, window in wanted.items():
            where = f"output_shm.{name}"
            if outputs is not None and type(outputs) is list and name not in outputs:
                raise InvalidArgument(f"{where}: '{name}' is not among the outputs asked for")
            region, offset, nbytes = _window(window, where)
            shm.check_window(region, offset, nbytes, where)
            self.windows[name] = (region, offset, nbytes)

    def encode(self, outputs: dict, encode) -> dict:
        """The response's outputs: those with a window written into it (the map says
        where, with the bytes written as nbytes), the others ``encode``d as usual."""
        out = {}
        for name, array in outputs.items():
            window = self.windows.get(name)
            if window is None:
                out[name] = encode(array)
                continue
            region, offset, nbytes = window
            dtype = NAME_OF_DTYPE.get(array.dtype)
            if dtype is None:  # not a wire dtype: encode() names the problem
                encode(array)
            self.shm.write(region, offset, nbytes, array, f"output_shm.{name}")
            out[name] = {"dtype": dtype, "shape": list(array.shape),
                         "shm": {"region": region, "offset": offset, "nbytes": array.nbytes}}
        return out


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
                      "unload": self.unload, "update_activation": self.update_activation}
        # Shared memory: the connection owns what it registers (released at its close)
        self.per_connection = {"shm_register": self.shm_register,
                               "shm_status": self.shm_status,
                               "shm_unregister": self.shm_unregister}
        self.names = ("hello", self.INFER, "models", "metadata", "health", "stats",
                      *self.admin, *SHM_OPS)

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
                "memory": self.service.memory(),
                "uptime_s": round(time.time() - self.service.started, 3), "pid": os.getpid()}

    def shm_register(self, msg: dict, owner: object) -> dict:
        self.service.shared_memory.register(msg.get("name"), msg.get("key"),
                                            msg.get("offset", 0), msg.get("byte_size"), owner)
        return {}

    def shm_status(self, msg: dict, owner: object) -> dict:
        return {"regions": [{"name": r.name, "key": r.key, "offset": r.offset,
                             "byte_size": r.byte_size}
                            for r in self.service.shared_memory.status(msg.get("name", ""))]}

    def shm_unregister(self, msg: dict, owner: object) -> dict:
        return {"unregistered": self.service.shared_memory.unregister(msg.get("name", ""))}

    async def activate(self, msg: dict) -> dict:
        return await self.service.activate(msg.get("model"), msg.get("version"))

    async def traffic(self, msg: dict) -> dict:
        name = msg.get("model")
        change = {k: msg[k] for k in ("policy", "clear") if k in msg}
        return {"model": name, "traffic": await self.service.traffic(name, change or None)}

    async def update_activation(self, msg: dict) -> dict:
        return await self.service.update_activation(
            {k: msg[k] for k in ("action", "for_s", "model") if k in msg})

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
