"""HTTP against clients that stall, idle, crowd or keep sending through a shutdown.

Real server processes with short timeouts (server.stall_timeout_s 0.5 s,
http.idle_timeout_s 1.5 s); each attack is timed, and a well-behaved client is served
while it lasts.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.demo.launcher import ServerProcess
from tests.conftest import add_demo_models
from tests.support.http_server import http_url
from tests.support.process_state import log_records, open_fds

STALL_S = 0.5
IDLE_S = 1.5
SLACK_S = 1.5  # a loaded 2-core machine: timers fire late, processes wake late


def start(data_dir: Path, demo_files, server: dict, http: dict) -> tuple[ServerProcess, int]:
    add_demo_models(data_dir, demo_files)
    lines = ["[server]", *(f"{k} = {json.dumps(v)}" for k, v in server.items()),
             "[http]", 'address = "127.0.0.1:0"',
             *(f"{k} = {json.dumps(v)}" for k, v in http.items())]
    (data_dir / "outpost.toml").write_text("\n".join(lines) + "\n")
    proc = ServerProcess(data_dir, extra_args=["--config", str(data_dir / "outpost.toml")])
    proc.start()
    return proc, int(http_url(proc).rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def served(demo_files):
    data_dir = Path(tempfile.mkdtemp(prefix="op-"))
    proc, port = start(data_dir, demo_files, {"stall_timeout_s": STALL_S},
                       {"idle_timeout_s": IDLE_S})
    yield proc, port
    code = proc.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    assert code == 0, proc.log_tail()


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def read_until_closed(s: socket.socket, deadline: float) -> tuple[bytes, float]:
    """Everything the server sends, and when it closed the connection."""
    buf = b""
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after the deadline; got {buf[:200]!r}") from None
    return buf, time.monotonic()


def status_and_body(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


class GoodClient(threading.Thread):
    """Keep-alive requests in a loop until stopped; every answer must be right."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port, self.done, self.ok, self.errors = port, threading.Event(), 0, []

    def run(self) -> None:
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                       "data": [1.0] * 16}]})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            while not self.done.is_set():
                c.request("POST", "/v2/models/identity/infer", body=body,
                          headers={"Content-Type": "application/json"})
                resp = c.getresponse()
                data = resp.read()
                if resp.status != 200:
                    self.errors.append((resp.status, data))
                self.ok += 1
                time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.errors.append(repr(exc))
        finally:
            c.close()

    def finish(self) -> int:
        self.done.set()
        self.join(10)
        assert not self.errors, self.errors
        return self.ok


def test_stalled_heads_and_bodies_are_cut_and_others_served(served):
    proc, port = served
    good = GoodClient(port)
    good.start()
    time.sleep(0.2)
    start_fds = open_fds(proc.pid)
    n = 30
    conns = []
    t0 = time.monotonic()
    for i in range(n):
        s = raw(port)
        if i % 2:  # a request line and one header
            s.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n")
        else:  # the head, and half of the body it announces
            s.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                      + b"{" + b" " * 199)
        conns.append((i % 2, s))
    deadline = time.monotonic() + STALL_S
    while open_fds(proc.pid) < start_fds + n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert open_fds(proc.pid) >= start_fds + n  # they are open: accepted, each a descriptor
    lived = []
    for part, s in conns:
        answer, at = read_until_closed(s, t0 + STALL_S + SLACK_S)
        lived.append(at - t0)
        status, body = status_and_body(answer)
        assert status == 408, answer
        assert "server.stall_timeout_s" in body["error"], body
        assert ("head" if part else "body") in body["error"], body
        s.close()
    print(f"stalled HTTP connections lived {min(lived):.2f}..{max(lived):.2f} s")
    assert STALL_S * 0.9 <= min(lived) and max(lived) < STALL_S + SLACK_S, lived
    time.sleep(0.3)
    assert good.finish() >= 10  # served all along
    deadline = time.monotonic() + 5
    while open_fds(proc.pid) > start_fds + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(proc.pid) <= start_fds + 2, (open_fds(proc.pid), start_fds)


def test_a_connection_that_sends_nothing_is_closed(served):
    _, port = served
    s = raw(port)
    t0 = time.monotonic()
    answer, at = read_until_closed(s, t0 + STALL_S + SLACK_S)
    s.close()
    assert answer == b""  # nothing asked, nothing answered
    assert STALL_S * 0.9 <= at - t0 < STALL_S + SLACK_S


def test_keep_alive_idle_is_kept_until_idle_timeout(served):
    _, port = served
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/v2/health/live")
    assert c.getresponse().read() == b"" and c.sock is not None
    t0 = time.monotonic()
    time.sleep(STALL_S * 2)  # idle between requests past the stall timeout: kept
    c.request("GET", "/v2/health/live")
    resp = c.getresponse()
    resp.read()
    assert resp.status == 200 and not resp.will_close
    t0 = time.monotonic()
    answer, at = read_until_closed(c.sock, t0 + IDLE_S + SLACK_S)
    c.close()
    assert answer == b""
    assert IDLE_S * 0.9 <= at - t0 < IDLE_S + SLACK_S, at - t0


def test_parser_limits_answer_400_naming_them(served):
    _, port = served
    with raw(port) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000
                  + b"\r\n\r\n")
        answer, _ = read_until_closed(s, time.monotonic() + 5)
    status, body = status_and_body(answer)
    assert status == 400 and "8190" in body["error"], answer
    with raw(port) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
                  + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n")
        answer, _ = read_until_closed(s, time.monotonic() + 5)
    status, body = status_and_body(answer)
    assert status == 400 and "128" in body["error"], answer


def test_connection_limit_refuses_at_once_and_logs_once(demo_files, short_tmp):
    proc, port = start(short_tmp, demo_files, {}, {"max_connections": 4})
    try:
        held = []
        for _ in range(4):  # the limit, each kept alive after a request
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/v2/health/live")
            c.getresponse().read()
            held.append(c)
        for _ in range(3):
            s = raw(port)
            t0 = time.monotonic()
            answer, at = read_until_closed(s, t0 + 2)  # refused without asking anything
            s.close()
            status, body = status_and_body(answer)
            assert status == 503 and b"Connection: close" in answer, answer
            assert "http.max_connections = 4" in body["error"]
            assert at - t0 < 0.5
        held[0].request("GET", "/v2/health/live")  # those held are served as ever
        assert held[0].getresponse().status == 200
        for c in held:
            c.close()
        time.sleep(0.3)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # room again
        c.request("GET", "/v2/health/live")
        assert c.getresponse().status == 200
        c.close()
        lines = [x for x in log_records(proc)
                 if x.get("msg", "").startswith("connections refused")]
        assert len(lines) == 1, lines  # at most once a minute; the next counts the rest
        assert lines[0]["transport"] == "http" and lines[0]["refused"] == 1
    finally:
        assert proc.stop() == 0, proc.log_tail()


def test_sigterm_is_bounded_with_flooding_and_stalled_clients(demo_files, short_tmp):
    """Eight keep-alive clients sending large JSON requests back to back, one stalled
    mid-body and one idle: the process exits 0 within the drain timeout. The idle one is
    closed at once; each flooder gets 200s, then 503 or the close; the stalled one is
    answered 503 when the drain ends."""
    drain = 1.0
    proc, port = start(short_tmp, demo_files, {"drain_timeout_s": drain,
                                               "stall_timeout_s": 30.0}, {})
    image = np.random.default_rng(2).random((1, 3, 224, 224), np.float32)
    body = json.dumps({"inputs": [{"name": "image", "shape": list(image.shape),
                                   "datatype": "FP32",
                                   "data": image.ravel().tolist()}]}).encode()
    outcomes: dict[int, list] = {}
    stop_at = time.monotonic() + 30

    def flood(k: int) -> None:
        got = outcomes.setdefault(k, [])
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while time.monotonic() < stop_at:
                c.request("POST", "/v2/models/cnn/infer", body=body,
                          headers={"Content-Type": "application/json"})
                resp = c.getresponse()
                resp.read()
                got.append(resp.status)
                if resp.will_close:
                    break
        except (ConnectionError, OSError, http.client.HTTPException):
            got.append("closed")
        finally:
            c.close()

    threads = [threading.Thread(target=flood, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    stalled = raw(port)
    stalled.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % len(body) + body[:1000])
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    idle.request("GET", "/v2/health/live")
    idle.getresponse().read()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(o.count(200) for o in outcomes.values()) < 8:
        time.sleep(0.02)
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    answer, _ = read_until_closed(idle.sock, t0 + drain)
    assert answer == b""
    idle_closed = time.monotonic() - t0
    told, _ = read_until_closed(stalled, t0 + drain + SLACK_S)
    code = proc.proc.wait(drain + 5)
    took = time.monotonic() - t0
    for t in threads:
        t.join(10)
    idle.close()
    stalled.close()
    print(f"SIGTERM to exit: {took:.2f} s (idle closed after {idle_closed:.2f} s); answers "
          f"{ {k: {c: got.count(c) for c in set(got)} for k, got in outcomes.items()} }")
    assert code == 0, proc.log_tail()
    assert took < drain + 2.0, took  # unloading, and the interpreter's exit
    status, err = status_and_body(told)
    assert status == 503 and "drain_timeout_s" in err["error"], told
    for k, got in outcomes.items():
        assert got and 200 in got, (k, got)
        assert set(got) <= {200, 503, "closed"}, (k, got)
        assert all(x == 200 for x in got[:-1]), (k, got)  # only the last may be refused


def test_bugs_answer_500_without_their_text(short_tmp, caplog):
    """A handler that raises: 500 with the fixed message; the text is in the log."""
    import aiohttp

    from appliance.config.load import load_config
    from appliance.models.manager import ModelManager
    from appliance.models.repository import Repository
    from appliance.serving.service import Service
    from appliance.transport.http.server import HttpServer
    from engines.onnxruntime_engine import OnnxRuntimeEngine

    secret = "secret-detail-9c1e"

    def boom(*args, **kwargs):
        raise RuntimeError(secret)

    async def go():
        config = load_config(None, {"data_dir": str(short_tmp),
                                    "http.address": "127.0.0.1:0"})
        repo = Repository(short_tmp)
        service = Service(ModelManager(repo, OnnxRuntimeEngine(), config))
        service.statistics = boom
        server = HttpServer(service, config)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(server.url + "/v2/models/stats") as resp:
                    answer = (resp.status, await resp.json())
                async with session.get(server.url + "/v2/health/live") as resp:
                    after = resp.status
        finally:
            await server.stop()
            repo.close()
        return answer, after

    (status, body), after = asyncio.run(go())
    assert status == 500 and body == {"error": "internal error; see the server log"}
    assert after == 200
    assert secret in caplog.text
