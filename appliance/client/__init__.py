"""Python clients for the v1 socket protocol: ``Client`` (blocking) and ``AsyncClient``
(asyncio, pipelined: many requests in flight on one connection).

NumPy in, NumPy out. A failed request raises the typed exception of its protocol code
(``appliance.errors``: ``NotFound``, ``InvalidArgument``, ...); a broken connection raises
``Unavailable``. Output arrays are read-only views over the received frame.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.errors import InvalidArgument, OutpostError, Unavailable, error_from_wire
from appliance.paths import default_data_dir, default_socket_path, parse_host_port
from appliance.protocol.frames import (
    PROTOCOL_VERSION,
    FrameError,
    FrameReader,
    decode_body,
    encode_frame,
    encode_frame_parts,
    has_big_tensor,
)
from appliance.protocol.tensors import decode_tensor, encode_tensor

# A send buffer that holds a whole image request: one write, not a ping-pong of wake-ups
# between the two processes (the kernel caps it at net.core.wmem_max).
SOCKET_BUFFER_BYTES = 4 << 20


def _kernel_timeouts(sock: socket.socket, timeout_s: float | None) -> None:
    """Leave the timeout to the kernel (SO_RCVTIMEO, SO_SNDTIMEO): with a Python socket
    timeout, every send and receive is a poll() and then the call, and a non-blocking
    receive (busy polling) would wait in that poll. None: no timeout."""
    sock.settimeout(None)
    if timeout_s is None:
        return
    seconds = int(timeout_s)
    timeval = struct.pack("@ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _widen(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    except OSError:
        pass


@dataclass
class InferResult:
    model: str
    version: int
    outputs: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def default_socket() -> Path:
    env = os.environ.get("OUTPOST_SOCKET")
    return Path(env) if env else default_socket_path(default_data_dir())


def _infer_message(model, inputs, version, outputs, timeout_ms, priority) -> dict:
    if not isinstance(inputs, dict):
        raise InvalidArgument("inputs must be a dict of input name to NumPy array")
    msg = {"model": model,
           "inputs": {name: encode_tensor(arr) for name, arr in inputs.items()}}
    if version is not None:
        msg["version"] = version
    if outputs is not None:
        msg["outputs"] = list(outputs)
    if timeout_ms is not None:
        msg["timeout_ms"] = timeout_ms
    if priority is not None:
        msg["priority"] = priority
    return msg


def _result(response: dict) -> dict:
    if not response.get("ok"):
        raise error_from_wire(response.get("error"))
    return response


def _infer_result(response: dict) -> InferResult:
    outputs = {name: decode_tensor(t, f"outputs.{name}")
               for name, t in response["outputs"].items()}
    return InferResult(response["model"], response["version"], outputs)


class Client:
    """A blocking client: one request at a time on one connection.

    ``busy_poll_us``: after sending a request, keep checking the socket without sleeping
    for up to this long before blocking on it. The answer of a quick model is then taken
    without a wake-up of this process (on the demo identity model here, a round trip
    13 to 24 us shorter in four benchmark runs), at the cost of this process's CPU
    while it waits. 0 (the default): block at once.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, tcp: str | None = None,
                 token: str | None = None, timeout_s: float | None = 30.0,
                 busy_poll_us: int = 0):
        if busy_poll_us < 0:
            raise InvalidArgument(f"busy_poll_us is {busy_poll_us}; use 0 (off) or more")
        self._ids = itertools.count(1)
        self._reader = FrameReader(1 << 31)
        self._pending: list[bytes] = []
        self._busy_poll_s = busy_poll_us / 1e6
        self._timeout_s = timeout_s
        try:
            if tcp:
                host, port = parse_host_port(tcp, "tcp")
                self._sock = socket.create_connection((host, port), timeout=timeout_s)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                _widen(self._sock)
                self._sock.settimeout(timeout_s)
                self._sock.connect(str(path or default_socket()))
            _kernel_timeouts(self._sock, timeout_s)
        except OSError as exc:
            where = tcp or str(path or default_socket())
            raise Unavailable(f"can't connect to the outpost server at {where}: "
                              f"{exc.strerror or exc}; is 'outpost serve' running?") from exc
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        self.server_info: dict | None = None
        if tcp or token:
            self.server_info = self.hello(token)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def call(self, op: str, **fields) -> dict:
        """Send one request and return its response map (raises on an error response)."""
        return self._call(op, fields)

    def _call(self, op: str, fields: dict) -> dict:
        rid = next(self._ids)
        fields["op"] = op
        fields["id"] = rid
        if op == "infer" and has_big_tensor(fields["inputs"]):
            parts = encode_frame_parts(fields)
        else:
            parts = [encode_frame(fields)]
        return _result(self._roundtrip(parts, rid))

    def _roundtrip(self, parts: list, rid: int) -> dict:
        sock = self._sock
        try:
            for part in parts:
                sock.sendall(part)
            while True:
                while not self._pending:
                    data = self._poll() if self._busy_poll_s else None
                    if data is None:
                        # 64 KiB: a larger request size costs a fresh mmap per call
                        # (measured 16 us against 1.3 us for a small answer).
                        data = sock.recv(1 << 16)
                    if not data:
                        raise Unavailable("the server closed the connection")
                    self._pending.extend(self._reader.feed(data))
                response = decode_body(self._pending.pop(0))
                if response.get("id") in (rid, None):
                    return response
        except BlockingIOError as exc:  # the kernel's SO_RCVTIMEO / SO_SNDTIMEO passed
            raise Unavailable(f"no answer from the server within {self._timeout_s} s; "
                              f"it may be overloaded, or raise timeout_s") from exc
        except OSError as exc:
            raise Unavailable(f"connection to the server failed: {exc}") from exc
        except FrameError as exc:
            raise Unavailable(f"the server sent a broken frame: {exc}") from exc

    def _poll(self) -> bytes | None:
        """What arrives within the busy-poll window, taken without sleeping; None if
        nothing did."""
        sock = self._sock
        end = time.perf_counter() + self._busy_poll_s
        while True:
            try:
                return sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    return None

    def hello(self, token: str | None = None) -> dict:
        fields = {"v": PROTOCOL_VERSION}
        if token:
            fields["token"] = token
        return self.call("hello", **fields)

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: int | None = None,
              outputs: list[str] | None = None, timeout_ms: int | None = None,
              priority: int | None = None) -> InferResult:
        msg = _infer_message(model, inputs, version, outputs, timeout_ms, priority)
        return _infer_result(self._call("infer", msg))

    def models(self) -> list[dict]:
        return self.call("models")["models"]

    def metadata(self, model: str, version: int | None = None) -> dict:
        fields = {"model": model}
        if version is not None:
            fields["version"] = version
        return self.call("metadata", **fields)

    def health(self) -> dict:
        return self.call("health")

    def stats(self, model: str | None = None) -> dict:
        return self.call("stats", **({"model": model} if model else {}))


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, waiting: dict[int, asyncio.Future]):
        self.waiting = waiting
        self.reader = FrameReader(1 << 31)
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.lost: Exception | None = None
        self._drain_waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self.reader.feed(data)
            for body in bodies:
                response = decode_body(body)
                fut = self.waiting.pop(response.get("id"), None)
                if fut is None:  # id nil: the server refused the stream itself
                    self._fail_all(error_from_wire(response.get("error")))
                elif not fut.done():
                    fut.set_result(response)
        except FrameError as exc:
            self._fail_all(Unavailable(f"the server sent a broken frame: {exc}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.lost = Unavailable(f"the server closed the connection{f': {exc}' if exc else ''}")
        self._fail_all(self.lost)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _fail_all(self, error: Exception) -> None:
        waiting = list(self.waiting.values())
        self.waiting.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(error)

    def pause_writing(self) -> None:
        self._drain_waiter = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        self._drain_waiter = None


class AsyncClient:
    """An asyncio client; concurrent calls on one client are pipelined on its connection.

    Use ``await AsyncClient.connect(...)``.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._proto: _ClientProtocol | None = None
        self.server_info: dict | None = None

    @classmethod
    async def connect(cls, path: str | os.PathLike | None = None, *, tcp: str | None = None,
                      token: str | None = None) -> AsyncClient:
        self = cls()
        loop = asyncio.get_running_loop()
        try:
            if tcp:
                host, port = parse_host_port(tcp, "tcp")
                _, proto = await loop.create_connection(
                    lambda: _ClientProtocol(self._waiting), host, port)
                sock = proto.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                _widen(sock)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, str(path or default_socket()))
                except BaseException:
                    sock.close()
                    raise
                _, proto = await loop.create_unix_connection(
                    lambda: _ClientProtocol(self._waiting), sock=sock)
        except OSError as exc:
            where = tcp or str(path or default_socket())
            raise Unavailable(f"can't connect to the outpost server at {where}: "
                              f"{exc.strerror or exc}; is 'outpost serve' running?") from exc
        self._proto = proto
        if tcp or token:
            self.server_info = await self.hello(token)
        return self

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()

    async def call(self, op: str, **fields) -> dict:
        """Send one request and return its response map (raises on an error response)."""
        return await self._call(op, fields)

    async def _call(self, op: str, fields: dict) -> dict:
        proto = self._proto
        if proto.lost is not None:
            raise proto.lost
        rid = next(self._ids)
        fields["op"] = op
        fields["id"] = rid
        fut = proto.loop.create_future()
        self._waiting[rid] = fut
        if op == "infer" and has_big_tensor(fields["inputs"]):
            proto.transport.writelines(encode_frame_parts(fields))
        else:
            proto.transport.write(encode_frame(fields))
        if proto._drain_waiter is not None:
            await proto._drain_waiter
        return _result(await fut)

    async def hello(self, token: str | None = None) -> dict:
        fields = {"v": PROTOCOL_VERSION}
        if token:
            fields["token"] = token
        return await self.call("hello", **fields)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], *,
                    version: int | None = None, outputs: list[str] | None = None,
                    timeout_ms: int | None = None,
                    priority: int | None = None) -> InferResult:
        msg = _infer_message(model, inputs, version, outputs, timeout_ms, priority)
        return _infer_result(await self._call("infer", msg))

    async def models(self) -> list[dict]:
        return (await self.call("models"))["models"]

    async def metadata(self, model: str, version: int | None = None) -> dict:
        fields = {"model": model}
        if version is not None:
            fields["version"] = version
        return await self.call("metadata", **fields)

    async def health(self) -> dict:
        return await self.call("health")

    async def stats(self, model: str | None = None) -> dict:
        return await self.call("stats", **({"model": model} if model else {}))


__all__ = ["AsyncClient", "Client", "InferResult", "OutpostError"]
