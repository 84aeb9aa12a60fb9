"""The clients' sans-IO core: everything about a request except moving its bytes.

No sockets, no asyncio. ``Codec`` owns a connection's request ids, builds a request's
frame and splits received bytes into response maps; ``result`` turns a response map into
its value or the typed exception of its code; ``Ops`` defines each op once, on top of one
method that the blocking and the asyncio client each implement with their own I/O:

    _send(op, fields, parse)

sends ``fields`` as a request for ``op`` and answers ``result(response, parse)``: the
value itself in ``Client``, an awaitable of it in ``AsyncClient``. The call travels as
those three arguments, not as an object: nothing is built per request beyond the map
that goes on the wire.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from appliance.client.shared_memory import RegionTensor, SharedRegion
from appliance.errors import InvalidArgument, Unavailable, error_from_wire
from appliance.paths import default_data_dir, default_socket_path
from appliance.protocol.frames import (
    PROTOCOL_VERSION,
    FrameError,
    FrameReader,
    decode_body,
    encode_frame,
    encode_frame_parts,
    has_big_tensor,
)
from appliance.protocol.tensors import decode_tensor, dtype_and_shape, encode_tensor

T = TypeVar("T")

# The client takes whatever frame the server sends: the server enforces its own limit
# (in the hello response) on what it receives.
MAX_RESPONSE_BYTES = 1 << 31


@dataclass
class InferResult:
    model: str
    version: int
    outputs: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def default_socket() -> Path:
    """Where the server listens when no path is given: $OUTPOST_SOCKET, else its default."""
    env = os.environ.get("OUTPOST_SOCKET")
    return Path(env) if env else default_socket_path(default_data_dir())


class Codec:
    """One connection's protocol state, with no I/O: request ids going out, the byte
    stream coming in. A client holds one per connection and moves the bytes itself:
    ``request`` gives the bytes to send; received bytes go to ``feed``, and
    ``next_response`` hands back the responses one at a time."""

    __slots__ = ("_ids", "_reader", "_bodies")

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._reader = FrameReader(MAX_RESPONSE_BYTES)
        self._bodies: deque = deque()  # whole frames received, not yet decoded

    def request(self, op: str, fields: dict) -> tuple[int, list]:
        """(id, frame parts) of a request: ``fields`` gets its ``op`` and a fresh ``id``
        (in place: the caller's map is the request). Parts are written in order; one part
        unless an infer input is large (``has_big_tensor``), whose data is then a part of
        its own, a view of the array, not copied into the frame."""
        rid = next(self._ids)
        fields["op"] = op
        fields["id"] = rid
        if op == "infer" and has_big_tensor(fields["inputs"]):
            return rid, encode_frame_parts(fields)
        return rid, [encode_frame(fields)]

    def feed(self, data: bytes) -> None:
        """Bytes received from the server (not changed afterwards: frames may be views
        of them). Raises Unavailable for a frame length that can't be right."""
        try:
            self._bodies.extend(self._reader.feed(data))
        except FrameError as exc:
            raise _broken(exc) from exc

    def next_response(self) -> dict | None:
        """The next response map received, or None until more bytes are fed. Raises
        Unavailable for a frame that is not one msgpack map: those before it were handed
        out first, and nothing after it can be trusted."""
        bodies = self._bodies
        if not bodies:
            return None
        try:
            return decode_body(bodies.popleft())
        except FrameError as exc:
            raise _broken(exc) from exc


def _broken(exc: FrameError) -> Unavailable:
    return Unavailable(f"the server sent a broken frame: {exc}")


def result(response: dict, parse: Callable[[dict], T] | None) -> T | dict:
    """A response's value (``parse(response)``, or the map itself without ``parse``), or
    the typed exception of its error code. A response with id nil is the server refusing
    the connection's stream (a broken frame, a missing token): its error, raised."""
    if not response.get("ok"):
        raise error_from_wire(response.get("error"))
    return response if parse is None else parse(response)


def infer_result(response: dict) -> InferResult:
    """Outputs as read-only arrays over the received frame."""
    outputs = {name: decode_tensor(t, f"outputs.{name}")
               for name, t in response["outputs"].items()}
    return InferResult(response["model"], response["version"], outputs)


def region_result(output_regions: dict[str, RegionTensor]) -> Callable[[dict], InferResult]:
    """``infer_result`` for a request whose outputs (some) went into shared memory: those
    are views of the client's region, shaped as the server says it wrote them."""
    def parse(response: dict) -> InferResult:
        outputs = {}
        for name, t in response["outputs"].items():
            target = output_regions.get(name)
            if target is None or "shm" not in t:
                outputs[name] = decode_tensor(t, f"outputs.{name}")
            else:
                dtype, shape = dtype_and_shape(t, f"outputs.{name}")
                outputs[name] = np.ndarray(shape, dtype, target.region.buffer, target.offset)
        return InferResult(response["model"], response["version"], outputs)
    return parse


def _wire_input(value) -> dict:
    return value.wire() if type(value) is RegionTensor else encode_tensor(value)


def models_list(response: dict) -> list[dict]:
    return response["models"]


def _regions_list(response: dict) -> list[dict]:
    return response["regions"]


# What an op returns: the value in ``Client``, an awaitable of it in ``AsyncClient``
# (see ``Ops``).
Reply = T | Awaitable[T]


class Ops:
    """The ops of protocol v1, each written once for both clients.

    An op builds its request map and hands it to ``self._send(op, fields, parse)``, and
    returns what that returns: ``Client._send`` does the round trip and returns the value;
    ``AsyncClient._send`` is a coroutine function, so ``await client.infer(...)``. Python
    typing can't say "the value, wrapped as this subclass wraps it", hence ``Reply[T]``:
    the value or an awaitable of it.

    Bad arguments (inputs that are not a dict, a dtype the wire lacks) raise
    InvalidArgument from the call itself, before anything is sent, in both clients.
    """

    __slots__ = ()

    def _send(self, op: str, fields: dict, parse: Callable[[dict], T] | None) -> Reply[T]:
        raise NotImplementedError

    def call(self, op: str, **fields) -> Reply[dict]:
        """Send one request and return its response map (raises on an error response)."""
        return self._send(op, fields, None)

    def hello(self, token: str | None = None) -> Reply[dict]:
        fields = {"v": PROTOCOL_VERSION}
        if token:
            fields["token"] = token
        return self._send("hello", fields, None)

    def infer(self, model: str, inputs: dict[str, np.ndarray | RegionTensor], *,
              version: int | None = None, outputs: list[str] | None = None,
              timeout_ms: int | None = None, priority: int | None = None,
              output_regions: dict[str, RegionTensor] | None = None) -> Reply[InferResult]:
        """``inputs``: arrays, or windows of a registered region (``region.tensor(...)``)
        the server reads in place. ``output_regions``: outputs the server writes into a
        region; the result's array for each is a view of it."""
        if not isinstance(inputs, dict):
            raise InvalidArgument("inputs must be a dict of input name to NumPy array")
        fields = {"model": model,
                  "inputs": {name: _wire_input(arr) for name, arr in inputs.items()}}
        parse = infer_result
        if output_regions:
            fields["output_shm"] = {name: t.window() for name, t in output_regions.items()}
            parse = region_result(output_regions)
        if version is not None:
            fields["version"] = version
        if outputs is not None:
            fields["outputs"] = list(outputs)
        if timeout_ms is not None:
            fields["timeout_ms"] = timeout_ms
        if priority is not None:
            fields["priority"] = priority
        return self._send("infer", fields, parse)

    def models(self) -> Reply[list[dict]]:
        return self._send("models", {}, models_list)

    def metadata(self, model: str, version: int | None = None) -> Reply[dict]:
        fields = {"model": model}
        if version is not None:
            fields["version"] = version
        return self._send("metadata", fields, None)

    def register_region(self, region: SharedRegion) -> Reply[dict]:
        """Register a region with the server (``shared_memory`` does it for you); it is
        unregistered when this connection closes."""
        return self._send("shm_register", region.register_fields(), None)

    def unregister_region(self, name: str = "") -> Reply[dict]:
        """Unregister a region by name ("": every region)."""
        return self._send("shm_unregister", {"name": name}, None)

    def regions(self) -> Reply[list[dict]]:
        """The regions registered with the server: name, key, offset, byte_size."""
        return self._send("shm_status", {}, _regions_list)

    def update_activation(self, action: str | None = None, *, for_s: float | None = None,
                          model: str | None = None) -> Reply[dict]:
        """The app's word on a pending OTA activation: "allow", "defer" (for ``for_s``
        seconds; None: as long as the release allows), or None to read; answers
        ``{"updates": [{model, version, state, detail, until, ...}]}``."""
        fields = {k: v for k, v in (("action", action), ("for_s", for_s), ("model", model))
                  if v is not None}
        return self._send("update_activation", fields, None)

    def health(self) -> Reply[dict]:
        return self._send("health", {}, None)

    def stats(self, model: str | None = None) -> Reply[dict]:
        return self._send("stats", {"model": model} if model else {}, None)
