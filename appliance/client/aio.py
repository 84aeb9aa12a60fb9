"""``AsyncClient``: the asyncio client's transport I/O. Concurrent calls are pipelined on
one connection, each waiting on a future keyed by its request id. What goes on the wire,
and what comes back, is ``core``'s."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import TypeVar

from appliance.client.blocking import widen
from appliance.client.core import Codec, Ops, default_socket, result
from appliance.client.shared_memory import SharedRegion
from appliance.errors import OutpostError, Unavailable, error_from_wire
from appliance.paths import parse_host_port

T = TypeVar("T")


class _ClientProtocol(asyncio.Protocol):
    """Hands each response to the future waiting on its id. A response with id nil (the
    server refused the stream), a broken frame or a lost connection fails every waiter."""

    def __init__(self, codec: Codec, waiting: dict[int, asyncio.Future]):
        self.codec = codec
        self.waiting = waiting
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.lost: Exception | None = None
        self._drain_waiter: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        try:
            codec.feed(data)
            while (response := codec.next_response()) is not None:
                fut = self.waiting.pop(response.get("id"), None)
                if fut is None:  # id nil: the server refused the stream itself
                    self._fail_all(error_from_wire(response.get("error")))
                elif not fut.done():
                    fut.set_result(response)
        except Unavailable as exc:  # a broken frame: nothing after it can be trusted
            self._fail_all(exc)
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


class AsyncClient(Ops):
    """An asyncio client; concurrent calls on one client are pipelined on its connection.

    Use ``await AsyncClient.connect(...)``; every op returns an awaitable.
    """

    def __init__(self) -> None:
        self._codec = Codec()
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
                    lambda: _ClientProtocol(self._codec, self._waiting), host, port)
                sock = proto.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                widen(sock)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, str(path or default_socket()))
                except BaseException:
                    sock.close()
                    raise
                _, proto = await loop.create_unix_connection(
                    lambda: _ClientProtocol(self._codec, self._waiting), sock=sock)
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

    @contextlib.asynccontextmanager
    async def shared_memory(self, byte_size: int, name: str | None = None):
        """``Client.shared_memory``, awaited: ``async with client.shared_memory(n) as r``."""
        region = SharedRegion(byte_size, name)
        registered = False
        try:
            await self.register_region(region)
            registered = True
            yield region
        finally:
            try:
                if registered:
                    await self.unregister_region(region.name)
            except OutpostError:  # the connection is gone: the server let go of it
                pass
            finally:
                region.close()

    async def _send(self, op: str, fields: dict, parse: Callable[[dict], T] | None) -> T:
        proto = self._proto
        if proto.lost is not None:
            raise proto.lost
        rid, parts = self._codec.request(op, fields)
        fut = proto.loop.create_future()
        self._waiting[rid] = fut
        if len(parts) == 1:
            proto.transport.write(parts[0])
        else:
            proto.transport.writelines(parts)
        if proto._drain_waiter is not None:
            await proto._drain_waiter
        return result(await fut, parse)
