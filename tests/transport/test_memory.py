"""Memory and descriptors under malformed traffic, against the real server process: a
stream of mutated frames leaves no high-water mark, and a client that half-closes its
connection has it closed once its answers are written."""

from __future__ import annotations

import random
import socket
import struct
import time

import numpy as np

from tests.support.process_state import open_fds, rss_mb
from tests.support.wire import call, connect, frame, tensor


def valid_frames() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [frame({"op": "infer", "id": 1, "model": model,
                   "inputs": {name: tensor(rng.random(shape, dtype=np.float32))}})
            for model, name, shape in (("identity", "x", (1, 16)), ("mlp", "features", (1, 32)),
                                       ("cnn", "image", (1, 3, 224, 224)))]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One of: bytes flipped in the body, a wrong length (small or up to the frame limit
    or past it), a truncated frame, a run of random bytes written over it."""
    f = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randrange(1, 20)):
            f[rng.randrange(4, len(f))] = rng.randrange(256)
    elif kind == 1:
        f[:4] = struct.pack(">I", rng.randrange(1, 64 << 20))
    elif kind == 2:
        f = f[:rng.randrange(4, len(f))]
    elif kind == 3:
        f[:4] = struct.pack(">I", rng.randrange(0, 2 ** 32))
    else:
        i = rng.randrange(4, len(f))
        f[i:i + rng.randrange(1, 64)] = rng.randbytes(rng.randrange(1, 64))
    return bytes(f)


def send_and_hang_up(path, data: bytes) -> None:
    """Send, say no more (half close), read whatever comes until the server closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
    except OSError:
        pass  # the server refused the frame and closed: what a broken frame gets
    finally:
        s.close()


def test_mutated_frames_leave_no_high_water_mark(module_server):
    pid, path = module_server.pid, module_server.socket_path
    frames = valid_frames()
    for _ in range(50):  # warm up every path a good request takes
        for f in frames:
            send_and_hang_up(path, f)
    base_rss, base_fds = rss_mb(pid), open_fds(pid)
    rng = random.Random(7)
    peak = base_rss
    for i in range(3000):
        send_and_hang_up(path, mutate(rng, rng.choice(frames)))
        if i % 250 == 249:
            peak = max(peak, rss_mb(pid))
    assert peak <= base_rss + 30, (base_rss, peak)
    deadline = time.monotonic() + 10
    while open_fds(pid) > base_fds and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(pid) <= base_fds
    with connect(path) as s:  # and it still serves
        assert call(s, op="health", id=1)["ok"]


def test_a_half_closed_connection_is_closed_once_answered(module_server):
    """The peer said it sends no more (shutdown SHUT_WR) with requests in flight: they
    are answered, then the server closes, instead of keeping the connection (and its
    descriptor and buffers) open for good."""
    pid, path = module_server.pid, module_server.socket_path
    image = np.zeros((1, 3, 224, 224), np.float32)
    base_fds = open_fds(pid)
    clients = []
    for i in range(20):
        s = connect(path)
        s.sendall(frame({"op": "infer", "id": i, "model": "cnn",
                         "inputs": {"image": tensor(image)}}))
        s.shutdown(socket.SHUT_WR)
        clients.append(s)
    for s in clients:
        got = b""
        while chunk := s.recv(1 << 16):  # to the server's close: the test's timeout bounds it
            got += chunk
        (n,) = struct.unpack(">I", got[:4])
        assert len(got) == 4 + n  # the one answer, then the close
        s.close()
    deadline = time.monotonic() + 5
    while open_fds(pid) > base_fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(pid) <= base_fds
