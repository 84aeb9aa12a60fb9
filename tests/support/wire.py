"""Raw-socket helpers for protocol tests: bytes on the wire, no client library."""

from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np


def connect(path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def frame(obj) -> bytes:
    body = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv(s: socket.socket) -> dict:
    (n,) = struct.unpack(">I", recv_exact(s, 4))
    return msgpack.unpackb(recv_exact(s, n), raw=False)


def is_closed(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def tensor(arr: np.ndarray) -> dict:
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}


def call(s: socket.socket, **msg) -> dict:
    s.sendall(frame(msg))
    return recv(s)
