"""The clients' own behaviour over real sockets: the blocking client's busy polling and
timeout, both clients carrying every op, and answers that refuse the stream."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from appliance import errors
from appliance.client import AsyncClient, Client
from appliance.demo.models import sample_inputs
from appliance.protocol.frames import HEADER, FrameReader, decode_body, encode_frame


def _voluntary_switches() -> int:
    """This thread's voluntary context switches: one each time it sleeps for the socket."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


@pytest.mark.parametrize("busy_poll_us", [0, 200_000])
def test_busy_polling_takes_answers_without_sleeping(module_server, busy_poll_us):
    inputs = sample_inputs("identity")
    with Client(module_server.socket_path, busy_poll_us=busy_poll_us) as c:
        for _ in range(20):
            c.infer("identity", inputs)
        before = _voluntary_switches()
        for i in range(200):
            y = c.infer("identity", {"x": inputs["x"] + i})["y"]
            assert np.array_equal(y, inputs["x"] + i)
        slept = _voluntary_switches() - before
    if busy_poll_us:
        assert slept < 40, slept  # the 200 ms window catches nearly every answer
    else:
        assert slept >= 150, slept  # blocking: a sleep for (nearly) every answer


def test_busy_polling_still_waits_for_a_slow_answer(module_server):
    """An answer later than the window is still taken, by the blocking receive."""
    image = sample_inputs("cnn")
    with Client(module_server.socket_path, busy_poll_us=1) as c:
        assert c.infer("cnn", image)["probs"].shape == (1, 10)


@contextlib.contextmanager
def _silent_server(path, connections: int):
    """A Unix socket at ``path`` that accepts ``connections`` and never reads nor
    answers; closed, with what it accepted, on the way out."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(4)
    held = []
    threading.Thread(target=lambda: held.extend(silent.accept() for _ in range(connections)),
                     daemon=True).start()
    try:
        yield
    finally:
        silent.close()
        for conn, _ in held:
            conn.close()


def test_a_server_that_never_answers_times_out_with_one_clear_error(short_tmp):
    """The timeout is the kernel's (SO_RCVTIMEO), with or without busy polling."""
    path = short_tmp / "mute.sock"
    with _silent_server(path, connections=2):
        for busy_poll_us in (0, 1000):
            with Client(path, timeout_s=0.3, busy_poll_us=busy_poll_us) as c:
                t0 = time.monotonic()
                with pytest.raises(errors.Unavailable) as e:
                    c.health()
                waited = time.monotonic() - t0
            assert "no answer from the server within 0.3 s" in str(e.value)
            assert 0.25 <= waited < 5, waited


def test_a_server_that_never_reads_a_large_request_times_out_with_one_clear_error(short_tmp):
    """A tensor larger than the sockets' buffers goes out in parts; a server that reads
    none of it makes the send wait, and the kernel's SO_SNDTIMEO ends it."""
    path = short_tmp / "deaf.sock"
    big = np.zeros((16 << 20) // 4, np.float32)  # 16 MiB: far past both buffers
    with _silent_server(path, connections=1), Client(path, timeout_s=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable) as e:
            c.infer("cnn", {"x": big})
        waited = time.monotonic() - t0
    assert "no answer from the server within 0.3 s" in str(e.value)
    assert 0.25 <= waited < 5, waited


def test_a_negative_busy_poll_is_refused(module_server):
    with pytest.raises(errors.InvalidArgument, match="busy_poll_us"):
        Client(module_server.socket_path, busy_poll_us=-1)


def test_both_clients_answer_every_op_alike(module_server):
    """The ops are written once (appliance/client/core.py); each client's I/O carries
    them: a 1.2 MB image goes out as a view of its array, in both."""
    image = sample_inputs("cnn", batch=2)
    x = sample_inputs("identity")["x"]

    def summary(hello, models, metadata, health, stats, called, cnn, ident):
        return (hello["v"], sorted(m["name"] for m in models), metadata["inputs"],
                health["live"], sorted(stats), called["ready"], cnn["probs"].shape,
                ident.model, ident.version, ident["y"].tolist())

    with Client(module_server.socket_path) as c:
        blocking = summary(c.hello(), c.models(), c.metadata("identity"), c.health(),
                           c.stats("identity"), c.call("health"), c.infer("cnn", image),
                           c.infer("identity", {"x": x}, outputs=["y"], timeout_ms=5000))

    async def go():
        async with await AsyncClient.connect(module_server.socket_path) as c:
            return summary(await c.hello(), await c.models(), await c.metadata("identity"),
                           await c.health(), await c.stats("identity"),
                           await c.call("health"), await c.infer("cnn", image),
                           await c.infer("identity", {"x": x}, outputs=["y"],
                                         timeout_ms=5000))

    assert asyncio.run(go()) == blocking
    assert blocking[-1] == x.tolist() and blocking[6] == (2, 10)


class _ScriptedServer:
    """A Unix socket server that reads ``n_requests`` frames on its one connection, then
    writes ``answer`` and keeps the connection open."""

    def __init__(self, path, n_requests: int, answer: bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.conns: list[socket.socket] = []
        self.requests: list[dict] = []
        self.thread = threading.Thread(target=self._run, args=(n_requests, answer),
                                       daemon=True)
        self.thread.start()

    def _run(self, n_requests: int, answer: bytes) -> None:
        conn, _ = self.sock.accept()
        self.conns.append(conn)
        reader = FrameReader()
        while len(self.requests) < n_requests:
            data = conn.recv(1 << 16)
            if not data:
                return
            self.requests.extend(decode_body(b) for b in reader.feed(data))
        conn.sendall(answer)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


_REFUSED = encode_frame({"id": None, "ok": False, "error": {
    "code": "INVALID_ARGUMENT", "message": "frame length is 0; every frame holds one map"}})


def test_an_answer_with_id_nil_is_the_blocking_clients_error(short_tmp):
    server = _ScriptedServer(short_tmp / "s.sock", 1, _REFUSED)
    try:
        with Client(short_tmp / "s.sock", timeout_s=5) as c:
            with pytest.raises(errors.InvalidArgument, match="frame length is 0"):
                c.health()
    finally:
        server.close()
    assert server.requests == [{"op": "health", "id": 1}]


def test_an_answer_with_id_nil_fails_every_pipelined_request(short_tmp):
    server = _ScriptedServer(short_tmp / "s.sock", 2, _REFUSED)

    async def go():
        async with await AsyncClient.connect(short_tmp / "s.sock") as c:
            return await asyncio.wait_for(asyncio.gather(
                c.health(), c.models(), return_exceptions=True), 5)

    try:
        outcomes = asyncio.run(go())
    finally:
        server.close()
    assert [type(o) for o in outcomes] == [errors.InvalidArgument] * 2


def test_a_broken_frame_from_the_server_is_unavailable_in_both_clients(short_tmp):
    """A frame that is not a map comes after the answers before it; then the stream is
    done for."""
    not_a_map = msgpack.packb([1, 2])
    broken = (encode_frame({"id": 1, "ok": True, "live": True})
              + HEADER.pack(len(not_a_map)) + not_a_map)
    server = _ScriptedServer(short_tmp / "a.sock", 1, broken)
    try:
        with Client(short_tmp / "a.sock", timeout_s=5) as c:
            assert c.health()["live"] is True  # the frame before it is answered
            with pytest.raises(errors.Unavailable, match="broken frame: frame holds a msgpack"):
                c.health()
    finally:
        server.close()

    server = _ScriptedServer(short_tmp / "b.sock", 2, broken)

    async def go():
        async with await AsyncClient.connect(short_tmp / "b.sock") as c:
            outcomes = await asyncio.wait_for(asyncio.gather(
                c.health(), c.health(), return_exceptions=True), 5)
            await asyncio.sleep(0)  # the client closed its end: the connection is lost
            with pytest.raises(errors.Unavailable, match="closed the connection"):
                await c.health()
            return outcomes

    try:
        first, second = asyncio.run(go())
    finally:
        server.close()
    assert first == {"id": 1, "ok": True, "live": True}
    assert isinstance(second, errors.Unavailable) and "broken frame" in str(second)


def test_a_frame_length_of_zero_from_the_server_is_unavailable(short_tmp):
    server = _ScriptedServer(short_tmp / "s.sock", 1, HEADER.pack(0))
    try:
        with Client(short_tmp / "s.sock", timeout_s=5) as c:
            with pytest.raises(errors.Unavailable, match="broken frame: frame length is 0"):
                c.health()
    finally:
        server.close()
