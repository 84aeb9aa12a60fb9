"""``Client``: the blocking client's socket I/O. What goes on the wire, and what comes
back, is ``core``'s."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from appliance.client.core import Codec, Ops, default_socket, result
from appliance.client.shared_memory import SharedRegion
from appliance.errors import InvalidArgument, OutpostError, Unavailable
from appliance.paths import parse_host_port

# A send buffer that holds a whole image request: one write, not a ping-pong of wake-ups
# between the two processes (the kernel caps it at net.core.wmem_max).
SOCKET_BUFFER_BYTES = 4 << 20

# 64 KiB: a larger request size costs a fresh mmap per call (measured 16 us against
# 1.3 us for a small answer).
RECV_BYTES = 1 << 16

T = TypeVar("T")


def kernel_timeouts(sock: socket.socket, timeout_s: float | None) -> None:
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


def widen(sock: socket.socket) -> None:
    """Socket buffers of SOCKET_BUFFER_BYTES, where the kernel allows it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    except OSError:
        pass


class Client(Ops):
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
        self._codec = Codec()
        self._busy_poll_s = busy_poll_us / 1e6
        self._timeout_s = timeout_s
        try:
            if tcp:
                host, port = parse_host_port(tcp, "tcp")
                self._sock = socket.create_connection((host, port), timeout=timeout_s)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                widen(self._sock)
                self._sock.settimeout(timeout_s)
                self._sock.connect(str(path or default_socket()))
            kernel_timeouts(self._sock, timeout_s)
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

    @contextlib.contextmanager
    def shared_memory(self, byte_size: int, name: str | None = None):
        """A region of ``byte_size`` bytes, created, mapped and registered; on the way out
        unregistered and unlinked (the server lets go of it when the connection closes
        anyway)::

            with client.shared_memory(image.nbytes + 4000) as region:
                x = region.tensor(image.shape, image.dtype)
                y = region.tensor((1, 1000), np.float32, offset=image.nbytes)
                x.array[...] = image
                logits = client.infer("cnn", {"image": x}, output_regions={"logits": y})
        """
        region = SharedRegion(byte_size, name)
        registered = False
        try:
            self.register_region(region)
            registered = True
            yield region
        finally:
            try:
                if registered:
                    self.unregister_region(region.name)
            except OutpostError:  # the connection is gone: the server let go of it
                pass
            finally:
                region.close()

    def _send(self, op: str, fields: dict, parse: Callable[[dict], T] | None) -> T:
        """Send the request, then wait for its response (or one with id nil: the server
        refused the stream). Responses to other ids (a request given up on) are dropped."""
        rid, parts = self._codec.request(op, fields)
        sock = self._sock
        codec = self._codec
        try:
            for part in parts:
                sock.sendall(part)
            while True:
                response = codec.next_response()
                if response is None:
                    data = self._poll() if self._busy_poll_s else None
                    if data is None:
                        data = sock.recv(RECV_BYTES)
                    if not data:
                        raise Unavailable("the server closed the connection")
                    codec.feed(data)
                elif response.get("id") in (rid, None):
                    break
        except BlockingIOError as exc:  # the kernel's SO_RCVTIMEO / SO_SNDTIMEO passed
            raise Unavailable(f"no answer from the server within {self._timeout_s} s; "
                              f"it may be overloaded, or raise timeout_s") from exc
        except OSError as exc:
            raise Unavailable(f"connection to the server failed: {exc}") from exc
        return result(response, parse)

    def _poll(self) -> bytes | None:
        """What arrives within the busy-poll window, taken without sleeping; None if
        nothing did."""
        sock = self._sock
        end = time.perf_counter() + self._busy_poll_s
        while True:
            try:
                return sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    return None
