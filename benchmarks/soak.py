"""A soak: N minutes of everything at once against one real server, printed per minute.

    python -m benchmarks.soak [--minutes 10] [--plot soak.png] [--seed 1]

One real `outpost serve --http 127.0.0.1:0` process, started with no other flag, over the
demo models (identity, mlp, cnn) added with no config, plus a second mlp version for the
hot swaps. Its config file ($OUTPOST_CONFIG) holds only the [updater] table: the local
fleet server, a 2 s poll, a 20 s health watch (so a watch ends before the next update);
everything else, server.stall_timeout_s included, is left at its default. At once:

- well-formed load from separate client processes (multiprocessing spawn): AsyncClient
  closed loops over the socket (a few requests in flight per model), and HTTP v2 closed
  loops with binary and with JSON tensors (aiohttp), on all three models;
- a hot swap every 10 s: the socket admin op `activate` flips mlp between versions 1 and 2;
- an OTA update every minute (the first after 30 s): `outpost fleet publish` of the next
  identity version to a temporary fleet folder and `outpost fleet rollout --fraction 1`;
  `outpost fleet serve` on 127.0.0.1 serves it and the server's agent takes it;
- malformed traffic every few seconds, from a third client process: mutated frames on
  fresh socket connections (random bytes in a valid frame, lengths too short, too long,
  over the limit or zero, truncated bodies, bodies that are not a map) and bad HTTP
  requests (garbage, bad JSON, wrong shapes, unknown models, huge or lying lengths);
- stalled clients: every 10 s, 10 socket connections that send part of a frame and 10
  HTTP connections that send part of a request, then nothing; they are held until the
  server cuts them (server.stall_timeout_s) or the run ends.

Per minute it prints the well-formed requests that failed (by transport and code; the
target is 0: a request the harness built correctly must be answered, during a hot swap
too), p50/p99 per transport, the server's RSS (/proc/PID/status VmRSS) and open
descriptors (/proc/PID/fd), the updates applied and swaps done, the malformed requests
sent and the stalled connections held and cut; then a summary line, and a PNG plot
(needs matplotlib: pip install -e '.[bench]'). Printed and plotted, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import queue
import random
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TRANSPORTS = ("socket", "http-bin", "http-json")
SOCKET_LOAD = {"identity": 4, "mlp": 4, "cnn": 2}  # requests in flight, over 2 connections
HTTP_LOAD = {"identity": (2, 1), "mlp": (2, 1), "cnn": (1, 1)}  # (binary, JSON) in flight
SWAP_MODEL, OTA_MODEL = "mlp", "identity"
SWAP_EVERY_S = 10.0
OTA_EVERY_S = 60.0
MALFORMED_EVERY_S = 3.0  # each round: 3 mutated frames, 2 bad HTTP requests
STALL_EVERY_S = 10.0
STALLS_PER_ROUND = 20  # half socket, half HTTP
MAX_STALLS_HELD = 2000  # beyond it no new ones are opened (the client's descriptors)
REQUEST_TIMEOUT_S = 30.0  # a well-formed request unanswered this long counts as failed
SLOT_S = 5.0  # the plot's resolution: clients report every SLOT_S (divides 60)
DEVICE_ID = "soak-device"
UPDATER_TABLE = {"poll_interval_s": 2.0, "poll_jitter_s": 0.0, "health_window_s": 20.0}
PLOT_HELP = ("matplotlib is needed for the plot: .venv/bin/pip install -q matplotlib "
             "(or: pip install -e '.[bench]')")

# Latency histograms (10 us .. 100 s, 40 bins a decade: within 6%): bounded to send.
EDGES = np.logspace(-5, 2, 7 * 40 + 1)
CLOCK = time.perf_counter


def histogram(latencies_s: list[float]) -> np.ndarray:
    return np.histogram(np.clip(latencies_s, EDGES[0], EDGES[-2]), EDGES)[0]


def percentile_ms(counts: np.ndarray | None, q: float) -> float:
    if counts is None or not counts.sum():
        return float("nan")
    i = int(np.searchsorted(np.cumsum(counts), q / 100 * counts.sum()))
    i = min(i, len(counts) - 1)
    return math.sqrt(EDGES[i] * EDGES[i + 1]) * 1e3


# -- client processes -----------------------------------------------------------------------

class Tally:
    """One client process's counts since its last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.latencies: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        self.errors: dict[tuple, int] = {}
        self.events: dict[tuple, int] = {}
        self.cut_ages: list[float] = []
        self.gauges: dict[str, int] = {}

    def ok(self, transport: str, seconds: float) -> None:
        self.latencies[transport].append(seconds)

    def failed(self, transport: str, code: str) -> None:
        key = (transport, code)
        self.errors[key] = self.errors.get(key, 0) + 1

    def event(self, *key) -> None:
        self.events[key] = self.events.get(key, 0) + 1

    def take(self) -> dict:
        record = {"ok": {t: len(v) for t, v in self.latencies.items() if v},
                  "hist": {t: histogram(v) for t, v in self.latencies.items() if v},
                  "errors": self.errors, "events": self.events, "cut_ages": self.cut_ages,
                  "gauges": self.gauges}
        gauges = self.gauges
        self.reset()
        self.gauges = gauges
        return record


class Run:
    """When a client process stops: the deadline, or earlier when the soak is stopped."""

    def __init__(self, t0: float, deadline: float, total_s: float):
        self.t0, self.stop_at, self.total_s = t0, deadline, total_s
        self.stopped = asyncio.Event()

    def live(self) -> bool:
        return time.monotonic() < self.stop_at

    async def sleep_until(self, at: float) -> bool:
        """Sleep until ``at`` (monotonic); False when the run stops first."""
        delay = min(at, self.stop_at) - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), delay)
        return self.live() and time.monotonic() >= at - 1e-3


async def reporter(run: Run, tally: Tally, source: str, out, stop) -> None:
    """Every SLOT_S (aligned on the soak's start) send the tally of the slot that ended;
    watch the soak's stop event meanwhile."""
    k = 1
    while True:
        boundary = run.t0 + k * SLOT_S
        while time.monotonic() < min(boundary, run.stop_at):
            if stop.is_set():
                run.stop_at = time.monotonic()
                break
            await asyncio.sleep(min(0.25, max(0.0, boundary - time.monotonic())))
        if not run.live():
            run.stopped.set()
            return
        out.put((source, k - 1, tally.take()))
        k += 1


def final_slot(run: Run) -> int:
    last = max(0, math.ceil(run.total_s / SLOT_S) - 1)
    return min(last, int(max(0.0, time.monotonic() - run.t0) // SLOT_S))


def _client_process(kind: str, target: dict, t0: float, deadline: float, total_s: float,
                    seed: int, out, stop) -> None:
    """A spawned client process: ``kind`` is socket, http or chaos."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops it through ``stop``
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    main = {"socket": _socket_load, "http": _http_load, "chaos": _chaos}[kind]

    async def run_all() -> None:
        run = Run(t0, deadline, total_s)
        tally = Tally()
        report = asyncio.create_task(reporter(run, tally, kind, out, stop))
        try:
            await main(run, tally, target, random.Random(seed))
        except Exception as exc:  # noqa: BLE001 - said in the report, not a traceback
            tally.failed(kind, f"client crashed: {type(exc).__name__}: {exc}")
        run.stop_at = min(run.stop_at, time.monotonic())
        await report
        out.put((kind, final_slot(run), tally.take()))

    asyncio.run(run_all())


async def _socket_load(run: Run, tally: Tally, target: dict, rng: random.Random) -> None:
    from appliance.client import AsyncClient
    from appliance.demo.models import sample_inputs
    from appliance.errors import OutpostError

    class Connection:
        def __init__(self) -> None:
            self.client: AsyncClient | None = None
            self.lock = asyncio.Lock()

        async def get(self) -> AsyncClient:
            async with self.lock:
                # (_proto.lost: the client's record of its connection being gone)
                if self.client is None or self.client._proto.lost is not None:
                    if self.client is not None:
                        await self.client.close()
                    self.client = None
                    self.client = await AsyncClient.connect(target["socket"])
                return self.client

    async def worker(model: str, conn: Connection) -> None:
        inputs = sample_inputs(model)
        while run.live():
            try:
                client = await conn.get()
            except OutpostError:
                tally.failed("socket", "can't connect")
                await asyncio.sleep(0.2)
                continue
            t0 = CLOCK()
            try:
                await asyncio.wait_for(client.infer(model, inputs), REQUEST_TIMEOUT_S)
            except TimeoutError:
                tally.failed("socket", f"no answer in {REQUEST_TIMEOUT_S:g} s")
            except OutpostError as exc:
                lost = client._proto.lost is not None
                tally.failed("socket", "connection lost" if lost else exc.code)
            except OSError as exc:
                tally.failed("socket", f"transport {type(exc).__name__}")
            else:
                tally.ok("socket", CLOCK() - t0)

    connections = {m: [Connection(), Connection()] for m in SOCKET_LOAD}
    try:
        await asyncio.gather(*(worker(m, connections[m][i % 2])
                               for m, n in SOCKET_LOAD.items() for i in range(n)))
    finally:
        for pair in connections.values():
            for c in pair:
                if c.client is not None:
                    await c.client.close()


async def _http_load(run: Run, tally: Tally, target: dict, rng: random.Random) -> None:
    import aiohttp

    from benchmarks.bench_http import request_body

    url = target["http"]
    bodies = {(m, b): request_body(m, b) for m in HTTP_LOAD for b in (True, False)}

    async def worker(session, model: str, binary: bool) -> None:
        transport = "http-bin" if binary else "http-json"
        body, headers = bodies[(model, binary)]
        while run.live():
            t0 = CLOCK()
            try:
                async with session.post(f"{url}/v2/models/{model}/infer", data=body,
                                        headers=headers) as resp:
                    payload = await resp.read()
                    status = resp.status
            except TimeoutError:
                tally.failed(transport, f"no answer in {REQUEST_TIMEOUT_S:g} s")
                continue
            except aiohttp.ClientError as exc:
                tally.failed(transport, f"transport {type(exc).__name__}")
                await asyncio.sleep(0.05)
                continue
            if status == 200 and payload:
                tally.ok(transport, CLOCK() - t0)
            else:
                tally.failed(transport, f"HTTP {status}")

    total = sum(b + j for b, j in HTTP_LOAD.values())
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=total),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        await asyncio.gather(*(worker(session, m, binary)
                               for m, (b, j) in HTTP_LOAD.items()
                               for binary, n in ((True, b), (False, j)) for _ in range(n)))


# -- malformed traffic and stalled clients (the chaos process) -------------------------------

SOCKET_MUTATIONS = ("random-bytes", "short-length", "long-length", "oversize-length",
                    "zero-length", "truncated-body", "not-a-map")
HTTP_MUTATIONS = ("garbage", "bad-json", "wrong-shape", "unknown-model", "huge-length",
                  "lying-header-length", "random-bytes", "truncated-body")


def _valid_frame_body(rng: random.Random) -> bytes:
    import msgpack

    x = np.ones((1, 16), np.float32)
    return msgpack.packb({"op": "infer", "id": rng.randrange(1 << 30), "model": "identity",
                          "inputs": {"x": {"dtype": "float32", "shape": [1, 16],
                                           "data": x.tobytes()}}}, use_bin_type=True)


def mutated_frame(kind: str, rng: random.Random) -> tuple[bytes, bool]:
    """Bytes to send, and whether to close our side right after (a truncated body)."""
    import msgpack

    from appliance.protocol.frames import DEFAULT_MAX_FRAME_BYTES

    body = _valid_frame_body(rng)

    def head(n: int) -> bytes:
        return struct.pack(">I", n)

    if kind == "random-bytes":
        b = bytearray(body)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return head(len(b)) + bytes(b), False
    if kind == "short-length":
        return head(rng.randrange(1, len(body))) + body, False
    if kind == "long-length":  # announces more than comes: the server waits (a stall)
        return head(len(body) + rng.randint(1, 1000)) + body, False
    if kind == "oversize-length":
        return head(rng.choice([DEFAULT_MAX_FRAME_BYTES + 1, 0xFFFFFFFF])) + body[:16], False
    if kind == "zero-length":
        return head(0) + body, False
    if kind == "truncated-body":
        return head(len(body)) + body[:rng.randrange(1, len(body))], True
    junk = rng.choice([msgpack.packb([1, 2, 3]), msgpack.packb("infer"),
                       bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))])
    return head(len(junk)) + junk, False


def bad_http_request(kind: str, rng: random.Random, port: int) -> tuple[bytes, bool]:
    def request(path: str, body: bytes, headers: dict | None = None,
                length: int | None = None) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
                 f"Content-Length: {len(body) if length is None else length}",
                 *(f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}
                                            ).items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    infer = "/v2/models/identity/infer"
    good = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": [0.5] * 16}]}).encode()
    if kind == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) + b"\r\n\r\n", False
    if kind == "bad-json":
        return request(infer, good[:rng.randrange(1, len(good))]), False
    if kind == "wrong-shape":
        return request(infer, json.dumps({"inputs": [
            {"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [0] * 15}]}).encode()
            ), False
    if kind == "unknown-model":
        return request("/v2/models/no-such-model/infer", good), False
    if kind == "huge-length":
        return request(infer, b"", length=1 << 40), False
    if kind == "lying-header-length":
        head = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 64}}]}).encode()
        body = head + bytes(64)
        return request(infer, body, {"Content-Type": "application/octet-stream",
                                     "Inference-Header-Content-Length": str(len(body) + 10)}
                       ), False
    if kind == "random-bytes":
        b = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return request(infer, bytes(b)), False
    full = request(infer, good)  # truncated-body: the headers, part of the body, EOF
    return full[:len(full) - rng.randint(1, len(good) - 1)], True


async def _read_frames(reader, idle_s: float) -> tuple[list, bool]:
    """Response frames until EOF (True) or ``idle_s`` without bytes (False)."""
    import msgpack

    frames = []
    try:
        while True:
            head = await asyncio.wait_for(reader.readexactly(4), idle_s)
            (n,) = struct.unpack(">I", head)
            frames.append(msgpack.unpackb(await asyncio.wait_for(reader.readexactly(n),
                                                                 idle_s), raw=False))
    except TimeoutError:  # first: TimeoutError is an OSError too
        return frames, False
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return frames, True


async def send_malformed_frame(tally: Tally, path: str, rng: random.Random) -> None:
    kind = rng.choice(SOCKET_MUTATIONS)
    data, close_after = mutated_frame(kind, rng)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
    except (OSError, TimeoutError) as exc:
        tally.event("malformed", "socket", kind, f"can't connect ({type(exc).__name__})")
        return
    try:
        writer.write(data)
        if close_after:
            writer.write_eof()
        frames, closed = await _read_frames(reader, 2.0)
    except (ConnectionError, OSError):
        frames, closed = [], True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    codes = sorted({f.get("error", {}).get("code", "?") if not f.get("ok") else "ok"
                    for f in frames if isinstance(f, dict)})
    answer = "+".join(codes) if codes else "no answer"
    tally.event("malformed", "socket", kind,
                f"{answer}, {'closed' if closed else 'left open 2 s'}")


async def send_bad_http(tally: Tally, port: int, rng: random.Random) -> None:
    kind = rng.choice(HTTP_MUTATIONS)
    data, close_after = bad_http_request(kind, rng, port)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError) as exc:
        tally.event("malformed", "http", kind, f"can't connect ({type(exc).__name__})")
        return
    outcome = "no answer in 5 s"
    try:
        writer.write(data)
        if close_after:
            writer.write_eof()
        line = await asyncio.wait_for(reader.readline(), 5)
        parts = line.split()
        outcome = f"HTTP {parts[1].decode()}" if len(parts) > 1 else "closed, no answer"
    except TimeoutError:  # first: TimeoutError is an OSError too
        pass
    except (ConnectionError, OSError):
        outcome = "closed, no answer"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    tally.event("malformed", "http", kind, outcome)


def stall_bytes(transport: str, rng: random.Random, port: int) -> bytes:
    if transport == "socket":
        frame = struct.pack(">I", 60) + _valid_frame_body(rng)
        return frame[:rng.choice([1, 2, 3, 4, 4 + rng.randint(1, 40)])]
    request = (f"POST /v2/models/identity/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"inp")
    cut = rng.choice([rng.randint(1, 30),  # in the request line
                      rng.randint(40, request.index("\r\n\r\n")),  # in the headers
                      len(request)])  # in the body
    return request[:cut].encode()


async def _chaos(run: Run, tally: Tally, target: dict, rng: random.Random) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path, port = target["socket"], target["http_port"]
    held: set = set()
    tally.gauges["stalls held"] = 0

    async def stalled(transport: str) -> None:
        opened = time.monotonic()
        try:
            if transport == "socket":
                reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
            else:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, TimeoutError) as exc:
            tally.event("stall", transport, f"can't connect ({type(exc).__name__})")
            return
        held.add(writer)
        tally.gauges["stalls held"] = len(held)
        tally.event("stall", transport, "opened")
        try:
            writer.write(stall_bytes(transport, rng, port))
            answered = False
            read = asyncio.ensure_future(reader.read(65536))
            stop = asyncio.ensure_future(run.stopped.wait())
            while True:
                done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if read not in done:
                    read.cancel()
                    tally.event("stall", transport, "still open at the end")
                    break  # the run ended; the server never cut it
                try:
                    data = read.result()
                except (ConnectionError, OSError):
                    data = b""
                if data:
                    answered = True
                    read = asyncio.ensure_future(reader.read(65536))
                    continue
                tally.event("stall", transport, "cut, answered first" if answered else "cut")
                tally.cut_ages.append(time.monotonic() - opened)
                break
            stop.cancel()
        except (ConnectionError, OSError):
            tally.event("stall", transport, "cut")
            tally.cut_ages.append(time.monotonic() - opened)
        finally:
            held.discard(writer)
            tally.gauges["stalls held"] = len(held)
            writer.close()

    async def malformed_rounds() -> None:
        at = run.t0 + 1.0
        while await run.sleep_until(at):
            await asyncio.gather(*(send_malformed_frame(tally, path, rng) for _ in range(3)),
                                 *(send_bad_http(tally, port, rng) for _ in range(2)))
            at = max(at + MALFORMED_EVERY_S, time.monotonic())

    stall_tasks: set = set()

    async def stall_rounds() -> None:
        at = run.t0 + 2.0
        while await run.sleep_until(at):
            for i in range(STALLS_PER_ROUND):
                if len(held) >= MAX_STALLS_HELD:
                    tally.event("stall", "either", "not opened (client limit)")
                    continue
                task = asyncio.create_task(stalled("socket" if i % 2 == 0 else "http"))
                stall_tasks.add(task)
                task.add_done_callback(stall_tasks.discard)
            at += STALL_EVERY_S

    await asyncio.gather(malformed_rounds(), stall_rounds())
    await run.stopped.wait()
    if stall_tasks:
        await asyncio.wait(set(stall_tasks), timeout=10)
    tally.gauges.clear()  # closed by us now: not a figure of the run


# -- the soak's own side: server, fleet, swaps, updates, sampling ----------------------------

def outpost(*args, timeout: float = 180.0, stop: threading.Event | None = None
            ) -> tuple[int, str]:
    """Run an `outpost` command; (exit code, output). Killed on ``stop`` or timeout."""
    from appliance.paths import outpost_command

    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([*outpost_command(), *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        ends = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > ends or (stop is not None and stop.is_set()):
                proc.kill()
                proc.wait()
                return -9, "killed (timeout or stop)"
            time.sleep(0.1)
        out.seek(0)
        return proc.returncode, out.read().decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FleetServer:
    def __init__(self, folder: Path):
        self.dir, self.port, self.proc = folder, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from appliance.paths import outpost_command

        self.log = open(self.dir / "fleet-server.log", "ab")
        self.proc = subprocess.Popen(
            [*outpost_command(), "fleet", "serve", str(self.dir), "--host", "127.0.0.1",
             "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        ends = time.monotonic() + 60
        while time.monotonic() < ends:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fleet server exited: "
                                   f"{(self.dir / 'fleet-server.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the fleet server did not start within 60 s")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.log.close()
            self.proc = None


def proc_sample(pid: int) -> tuple[float, int, int] | None:
    """(RSS in MB, open descriptors, threads) of ``pid``, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, fds, int(fields["Threads"])


def fd_limit(pid: int) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


def journal(data_dir: Path) -> list[dict]:
    """The agent's updates of OTA_MODEL: version, step, outcome, detail, when activated."""
    try:
        with contextlib.closing(sqlite3.connect(data_dir / "state.db", timeout=1)) as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute(
                "select j.id, j.version, j.step, j.outcome, j.detail, "
                "(select min(ts) from update_steps s where s.update_id = j.id and "
                "s.step = 'watch') as activated_at, "
                "(select max(ts) from update_steps s where s.update_id = j.id and "
                "s.step = 'done') as done_at "
                "from update_journal j where j.model = ? order by j.id", [OTA_MODEL])]
    except sqlite3.Error:
        return []
    return rows


class Soak:
    """What the soak's own threads record; the main thread reads it."""

    def __init__(self, t0: float, total_s: float):
        self.t0, self.total_s = t0, total_s
        self.deadline = t0 + total_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.swaps: list[tuple[float, float, str]] = []  # (t, seconds, "ok" or error)
        # (publish started, rollout done, version, "ok" or the error), in soak seconds
        self.published: list[tuple[float, float, int, str]] = []
        self.wall0 = time.time() - (time.monotonic() - t0)  # journal times are wall clock

    def t(self) -> float:
        return time.monotonic() - self.t0

    def wait_until(self, at: float) -> bool:
        """Wait until ``at`` (soak seconds); False when the run ends first."""
        if at >= self.total_s:
            self.stop.wait(max(0.0, self.deadline - time.monotonic()))
            return False
        return not self.stop.wait(max(0.0, at - self.t())) and self.t() < self.total_s


def swapper(soak: Soak, socket_path: Path) -> None:
    """Flip SWAP_MODEL between versions 1 and 2 every SWAP_EVERY_S, over the socket."""
    from appliance.client import Client
    from appliance.errors import OutpostError

    at, version = SWAP_EVERY_S, 2
    while soak.wait_until(at):
        t0 = time.perf_counter()
        try:
            with Client(socket_path, timeout_s=60) as admin:
                admin.call("activate", model=SWAP_MODEL, version=version)
            result = "ok"
            version = 3 - version
        except OutpostError as exc:
            result = f"{exc.code}: {exc}"
        with soak.lock:
            soak.swaps.append((soak.t(), time.perf_counter() - t0, result))
        at = max(at + SWAP_EVERY_S, soak.t())


def publisher(soak: Soak, fleet: Path, model_file: Path, first_s: float) -> None:
    """Publish the next OTA_MODEL version and roll it out to the whole fleet, each minute."""
    at, version = first_s, 2
    while soak.wait_until(at):
        started = soak.t()
        code, out = outpost("fleet", "publish", fleet, model_file, "--name", OTA_MODEL,
                            "--version", version, stop=soak.stop)
        if code == 0:
            code, out = outpost("fleet", "rollout", fleet, OTA_MODEL, version,
                                "--fraction", "1", stop=soak.stop)
        result = "ok" if code == 0 else f"exit {code}: {' '.join(out.strip().splitlines()[-1:])}"
        with soak.lock:
            soak.published.append((started, soak.t(), version, result))
        version += 1
        at += OTA_EVERY_S


# -- aggregation and the report ------------------------------------------------------------

class Figures:
    """Everything the clients reported, by slot; the server's samples."""

    def __init__(self, total_s: float):
        self.n_slots = max(1, math.ceil(total_s / SLOT_S))
        self.ok = [dict.fromkeys(TRANSPORTS, 0) for _ in range(self.n_slots)]
        self.hist = [{} for _ in range(self.n_slots)]
        self.errors = [{} for _ in range(self.n_slots)]
        self.events = [{} for _ in range(self.n_slots)]
        self.cut_ages: list[list[float]] = [[] for _ in range(self.n_slots)]
        self.gauges: dict[str, dict] = {}
        self.samples: list[tuple[float, float, int, int]] = []  # (t, rss MB, fds, threads)
        self.stalls_held: list[tuple[float, int]] = []

    def add(self, source: str, slot: int, record: dict) -> None:
        slot = min(max(slot, 0), self.n_slots - 1)
        for t, n in record["ok"].items():
            self.ok[slot][t] += n
        for t, h in record["hist"].items():
            have = self.hist[slot].get(t)
            self.hist[slot][t] = h if have is None else have + h
        for table, new in ((self.errors, record["errors"]), (self.events, record["events"])):
            for k, n in new.items():
                table[slot][k] = table[slot].get(k, 0) + n
        self.cut_ages[slot].extend(record["cut_ages"])
        self.gauges[source] = record["gauges"]

    def slots_of(self, minute: int) -> range:
        per = int(60 // SLOT_S)
        return range(minute * per, min((minute + 1) * per, self.n_slots))

    def merged(self, slots) -> tuple[dict, dict, dict, dict]:
        ok, hist, errors, events = dict.fromkeys(TRANSPORTS, 0), {}, {}, {}
        for s in slots:
            for t in TRANSPORTS:
                ok[t] += self.ok[s][t]
            for t, h in self.hist[s].items():
                hist[t] = h if t not in hist else hist[t] + h
            for k, n in self.errors[s].items():
                errors[k] = errors.get(k, 0) + n
            for k, n in self.events[s].items():
                events[k] = events.get(k, 0) + n
        return ok, hist, errors, events

    def server_in(self, t_from: float, t_to: float) -> list[tuple]:
        return [s for s in self.samples if t_from <= s[0] < t_to + 1e-6]


def failures_text(errors: dict) -> str:
    return ", ".join(f"{t} {code} x{n}" for (t, code), n in sorted(errors.items()))


def minute_line(fig: Figures, soak: Soak, minute: int, updates: list[dict]) -> str:
    slots = fig.slots_of(minute)
    ok, hist, errors, events = fig.merged(slots)
    t_to = min((minute + 1) * 60.0, soak.total_s)
    samples = fig.server_in(minute * 60.0, t_to)
    rss = f"{samples[-1][1]:5.0f} MB" if samples else "   ? MB"
    fds = f"{samples[-1][2]:4d} (max {max(s[2] for s in samples):4d})" if samples else "?"
    lat = "  ".join(f"{t} {percentile_ms(hist.get(t), 50):.2f}/"
                    f"{percentile_ms(hist.get(t), 99):.1f}" for t in TRANSPORTS)
    with soak.lock:
        swaps = sum(1 for t, _, r in soak.swaps if r == "ok" and t < t_to)
        published = sum(1 for _, t, _, r in soak.published if r == "ok" and t < t_to)
    applied = sum(1 for u in updates if u["activated_at"] is not None
                  and u["activated_at"] - soak.wall0 < t_to)
    malformed = sum(n for k, n in events.items() if k[0] == "malformed")
    opened = sum(n for k, n in events.items() if k[0] == "stall" and k[2] == "opened")
    cut = sum(n for k, n in events.items() if k[0] == "stall" and k[2].startswith("cut"))
    failed = sum(errors.values())
    line = (f"min {minute + 1:>3}: ok {ok['socket']}/{ok['http-bin']}/{ok['http-json']}  "
            f"failed {failed}  p50/p99 ms {lat}  RSS {rss}  fds {fds}  "
            f"updates applied {applied} (published {published})  swaps {swaps}  "
            f"malformed {malformed}  stalls opened {opened} cut {cut}")
    if errors:
        line += f"\n          failed: {failures_text(errors)}"
    return line


def server_log_oddities(log_path: Path) -> list[str]:
    """Warning and error lines of the server's JSON log, by message, most frequent first."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                if line.strip():
                    counts["(not JSON) " + line[:100]] = counts.get(
                        "(not JSON) " + line[:100], 0) + 1
                continue
            if not isinstance(rec, dict):
                continue
            level = str(rec.get("level", rec.get("levelname", ""))).lower()
            if level in ("warning", "error", "critical"):
                key = f"{level}: {rec.get('msg', rec.get('message', ''))}"
                if rec.get("exc"):  # the exception's own last line says what it was
                    key += f" ({str(rec['exc']).strip().splitlines()[-1][:120]})"
                counts[key] = counts.get(key, 0) + 1
    return [f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]


def plot(path: Path, fig: Figures, soak: Soak, updates: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [(s + 0.5) * SLOT_S / 60 for s in range(fig.n_slots)]
    f, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    ax = axes[0]
    for t in TRANSPORTS:
        ax.plot(xs, [percentile_ms(fig.hist[s].get(t), 99) for s in range(fig.n_slots)],
                marker=".", label=f"{t} p99")
    ax.set_yscale("log")
    ax.set_ylabel("p99 latency (ms)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    ax.plot([s[0] / 60 for s in fig.samples], [s[1] for s in fig.samples], color="C3")
    ax.set_ylabel("server RSS (MB)")
    ax = axes[2]
    ax.plot([s[0] / 60 for s in fig.samples], [s[2] for s in fig.samples], color="C4",
            label="server's open descriptors")
    ax.plot([t / 60 for t, _ in fig.stalls_held], [n for _, n in fig.stalls_held],
            color="C7", linestyle="--", label="stalled connections held by the client")
    ax.set_ylabel("descriptors")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[3]
    ax.bar(xs, [sum(fig.errors[s].values()) for s in range(fig.n_slots)],
           width=SLOT_S / 60 * 0.8, color="C3")
    ax.set_ylabel(f"failed well-formed\nrequests per {SLOT_S:g} s")
    ax.set_ylim(bottom=0, top=max(1, *(sum(e.values()) for e in fig.errors)) * 1.1)
    ax.set_xlabel("minutes")
    with soak.lock:
        swaps = [t for t, _, r in soak.swaps if r == "ok"]
    activated = [u["activated_at"] - soak.wall0 for u in updates if u["activated_at"]]
    for a in axes:
        for t in swaps:
            a.axvline(t / 60, color="0.85", linewidth=0.6, zorder=0)
        for t in activated:
            a.axvline(t / 60, color="C2", linewidth=1.2, linestyle=":", zorder=0)
    axes[0].set_title(f"outpost soak, {soak.total_s / 60:g} min: grey = hot swap of "
                      f"{SWAP_MODEL}, green dotted = OTA update of {OTA_MODEL} activated",
                      fontsize=10)
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)


# -- main -----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the soak runs")
    ap.add_argument("--plot", type=Path, default=Path("soak.png"),
                    help="where the PNG plot goes (default: soak.png here)")
    ap.add_argument("--seed", type=int, default=1, help="the malformed traffic's random seed")
    args = ap.parse_args()
    if args.minutes <= 0:
        ap.error("--minutes must be > 0")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"outpost soak: {PLOT_HELP}", file=sys.stderr)
        return 2

    interrupted = False
    started: dict = {"procs": []}  # what is running, for the cleanup whatever happens
    tmp_handle = tempfile.TemporaryDirectory(prefix="op-soak-")
    tmp = Path(tmp_handle.name)
    try:
        setup(tmp, started)
        interrupted = run_soak(args, tmp, started)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup finishes, whatever comes
        for p in started["procs"]:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        if started.get("server") is not None:
            started["server"].stop()
        if started.get("fleet") is not None:
            started["fleet"].stop()
        tmp_handle.cleanup()
    return 130 if interrupted else 0


def setup(tmp: Path, started: dict) -> None:
    """The fleet (init, identity 1 rolled out as the floor, a running fleet server), the
    device's repository (demo models with no config, mlp 2 beside 1) and the server, put
    in ``started`` as each starts."""
    from appliance.demo.launcher import ServerProcess
    from appliance.demo.models import BUILDERS, mlp_model
    from appliance.models.repository import Repository
    from benchmarks.bench_socket import CLEAN_ENV

    print("# setting up: fleet repository, models, server (its first start measures each "
          "model's layout)", flush=True)
    fleet_dir = tmp / "fleet"
    for step in (("fleet", "init", fleet_dir),
                 ("fleet", "device-key", fleet_dir, DEVICE_ID, "--out", tmp / "report.key")):
        code, out = outpost(*step)
        if code != 0:
            raise SystemExit(f"outpost {' '.join(map(str, step))} failed:\n{out}")
    files = {n: b(tmp / f"{n}.onnx") for n, b in BUILDERS.items()}
    for step in (("fleet", "publish", fleet_dir, files[OTA_MODEL], "--name", OTA_MODEL,
                  "--version", 1),
                 ("fleet", "rollout", fleet_dir, OTA_MODEL, 1, "--fraction", "1")):
        code, out = outpost(*step)
        if code != 0:
            raise SystemExit(f"outpost {' '.join(map(str, step))} failed:\n{out}")
    fleet = started["fleet"] = FleetServer(fleet_dir)
    fleet.start()

    repo = Repository(tmp / "data")
    for name, path in files.items():
        repo.add(name, path)
    repo.add(SWAP_MODEL, mlp_model(tmp / "mlp-v2.onnx", seed=12), activate=False)
    repo.close()
    updater = {"fleet_url": fleet.url, "trusted_root": str(fleet_dir / "metadata/1.root.json"),
               "device_id": DEVICE_ID, "report_key_file": str(tmp / "report.key"),
               **UPDATER_TABLE}
    config = tmp / "outpost.toml"
    config.write_text("[updater]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                              for k, v in updater.items()))
    server = started["server"] = ServerProcess(
        tmp / "data", tmp / "s.sock", env={**CLEAN_ENV, "OUTPOST_CONFIG": str(config)},
        extra_args=["--http", "127.0.0.1:0"])
    start_shielded(server)
    started["model_file"] = files[OTA_MODEL]


def start_shielded(server) -> None:
    """``server.start()`` from a thread that blocks SIGINT: the server inherits the mask, so
    a Ctrl-C in the terminal stops the soak (which then stops the server with SIGTERM)
    instead of draining the server under the load first."""
    failed: list[BaseException] = []

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            server.start(timeout_s=300)  # the first start measures each model's layout
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            failed.append(exc)

    thread = threading.Thread(target=start, name="start-server", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if failed:
        raise failed[0]


def run_soak(args, tmp: Path, started: dict) -> bool:
    """The soak itself; True when it was interrupted."""
    from appliance.client import Client

    server, fleet, procs = started["server"], started["fleet"], started["procs"]
    model_file = started["model_file"]

    url = server.ready_record()["http"]
    # Version 2 of the swapped model measures its layout at its first load: before the
    # clock, as a device would have done long before.
    with Client(server.socket_path, timeout_s=300) as admin:
        admin.call("activate", model=SWAP_MODEL, version=2)
        admin.call("activate", model=SWAP_MODEL, version=1)
    pid = server.pid
    total_s = args.minutes * 60
    first_ota = min(30.0, total_s / 3)
    print(f"# outpost soak: {args.minutes:g} min, {os.cpu_count()} CPUs; server pid {pid} "
          f"(`outpost serve --http 127.0.0.1:0`, config: [updater] only; open files limit "
          f"{fd_limit(pid)}), http {url}, fleet {fleet.url}")
    print(f"# load: socket {SOCKET_LOAD} in flight, http (binary, JSON) {HTTP_LOAD}; swap "
          f"{SWAP_MODEL} 1<->2 every {SWAP_EVERY_S:g} s; OTA {OTA_MODEL} every "
          f"{OTA_EVERY_S:g} s from {first_ota:g} s; malformed every {MALFORMED_EVERY_S:g} s; "
          f"{STALLS_PER_ROUND} stalled clients every {STALL_EVERY_S:g} s")
    print("# per minute: ok socket/http-bin/http-json, failed well-formed requests, p50/p99 "
          "ms per transport, server RSS and open descriptors (at the minute's end), "
          "cumulative updates and swaps", flush=True)

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    target = {"socket": str(server.socket_path), "http": url,
              "http_port": int(url.rsplit(":", 1)[1])}
    t0 = time.monotonic() + 8.0  # the clients' start-up (spawn, imports) comes first
    for i, kind in enumerate(("socket", "http", "chaos")):
        p = ctx.Process(target=_client_process, name=f"soak-{kind}", daemon=True,
                        args=(kind, target, t0, t0 + total_s, total_s, args.seed + i, out,
                              stop))
        p.start()
        procs.append(p)
    while time.monotonic() < t0:
        time.sleep(0.05)
    soak = Soak(t0, total_s)
    fig = Figures(total_s)
    threads = [threading.Thread(target=swapper, args=(soak, server.socket_path), daemon=True),
               threading.Thread(target=publisher, args=(soak, tmp / "fleet", model_file,
                                                        first_ota), daemon=True)]
    for th in threads:
        th.start()
    start_sample = proc_sample(pid)
    n_minutes = math.ceil(total_s / 60 - 1e-9)
    printed = 0
    updates: list[dict] = []
    interrupted_at = None

    def drain(block_s: float = 0.0) -> None:
        """Take what the clients sent (waiting up to ``block_s`` for the first)."""
        with contextlib.suppress(queue.Empty):
            item = out.get(timeout=block_s) if block_s else out.get_nowait()
            while True:
                source, slot, record = item
                fig.add(source, slot, record)
                if "stalls held" in record["gauges"]:
                    fig.stalls_held.append((min(soak.total_s, (slot + 1) * SLOT_S),
                                            record["gauges"]["stalls held"]))
                item = out.get_nowait()

    try:
        next_sample = 0.0
        while soak.t() < total_s:
            time.sleep(min(0.5, max(0.0, total_s - soak.t())))
            drain()
            if soak.t() >= next_sample:
                s = proc_sample(pid)
                if s is not None:
                    fig.samples.append((soak.t(), *s))
                updates = journal(server.data_dir)
                next_sample += SLOT_S
            while printed < n_minutes - 1 and soak.t() >= (printed + 1) * 60 + 2.0:
                print(minute_line(fig, soak, printed, updates), flush=True)
                printed += 1
            if server.proc.poll() is not None:
                print(f"the server exited with {server.proc.returncode}; stopping", flush=True)
                break
    except KeyboardInterrupt:
        interrupted_at = soak.t()
        print(f"\ninterrupted at {interrupted_at:.0f} s: stopping the clients, then the "
              f"servers", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    soak.stop.set()
    stop.set()
    # The last sample taken while everything ran (the clients are closing theirs now).
    end_sample = fig.samples[-1][1:] if fig.samples else None
    ends = time.monotonic() + REQUEST_TIMEOUT_S + 15
    while any(p.is_alive() for p in procs) and time.monotonic() < ends:
        drain(0.2)
    drain()
    for th in threads:
        th.join(max(0.0, ends - time.monotonic()))
    updates = journal(server.data_dir)
    for m in range(printed, n_minutes):
        print(minute_line(fig, soak, m, updates), flush=True)
    code = server.stop()
    procs_left = [p.name for p in procs if p.is_alive()]
    summary(args, fig, soak, updates, start_sample, end_sample, code, server, procs_left,
            interrupted_at)
    return interrupted_at is not None


def summary(args, fig: Figures, soak: Soak, updates: list[dict], start, end, code: int,
            server, procs_left: list[str], interrupted_at) -> None:
    ok, hist, errors, events = fig.merged(range(fig.n_slots))
    total_ok = sum(ok.values())
    failed = sum(errors.values())
    with soak.lock:
        swaps_ok = [d for _, d, r in soak.swaps if r == "ok"]
        swaps_bad = [r for _, _, r in soak.swaps if r != "ok"]
        published = list(soak.published)
    outcomes: dict[str, int] = {}
    for u in updates:
        key = u["outcome"] or f"open ({u['step']})"
        outcomes[key] = outcomes.get(key, 0) + 1
    applied = sum(1 for u in updates if u["activated_at"] is not None)
    print("\n# details")
    if failed:
        print(f"failed well-formed requests: {failures_text(errors)}")
    for kind in ("socket", "http"):
        rows = {}
        for k, n in events.items():
            if k[0] == "malformed" and k[1] == kind:
                rows.setdefault(k[2], []).append(f"{k[3]} x{n}")
        for mutation, what in sorted(rows.items()):
            print(f"malformed {kind:6} {mutation:20} {', '.join(sorted(what))}")
    stall_rows: dict[str, int] = {}
    for k, n in events.items():
        if k[0] == "stall":
            stall_rows[f"{k[1]} {k[2]}"] = stall_rows.get(f"{k[1]} {k[2]}", 0) + n
    ages = [a for slot in fig.cut_ages for a in slot]
    print(f"stalled clients: {', '.join(f'{k} {n}' for k, n in sorted(stall_rows.items()))}; "
          f"cut after {statistics.median(ages):.1f} s median (max {max(ages):.1f} s)"
          if ages else f"stalled clients: "
          f"{', '.join(f'{k} {n}' for k, n in sorted(stall_rows.items()))}; none cut")
    for t_pub, t_out, v, r in published:
        u = next((u for u in updates if u["version"] == v), None)
        state = "not taken yet" if u is None else (
            f"{u['outcome'] or 'open at ' + u['step']}"
            + (f", activated {u['activated_at'] - soak.wall0 - t_out:.1f} s after the "
               f"rollout" if u["activated_at"] else "")
            + (f", done {u['done_at'] - soak.wall0 - t_out:.1f} s after it"
               if u["done_at"] else "")
            + (f" ({u['detail']})" if u["outcome"] not in ("committed", "") else ""))
        print(f"OTA {OTA_MODEL} {v}: publish from {t_pub:.0f} s, rolled out at {t_out:.0f} s "
              f"({r}); {state}")
    if swaps_ok:
        print(f"swaps: {len(swaps_ok)} ok, median {statistics.median(swaps_ok) * 1e3:.0f} ms, "
              f"max {max(swaps_ok) * 1e3:.0f} ms; {len(swaps_bad)} failed"
              + (f": {swaps_bad[:3]}" if swaps_bad else ""))
    fds = [s[2] for s in fig.samples]
    rss = [s[1] for s in fig.samples]
    if start and end:
        print(f"server: RSS {start[0]:.0f} -> {end[0]:.0f} MB (max {max(rss):.0f}), open "
              f"descriptors {start[1]} -> {end[1]} (max {max(fds)}), threads {start[2]} -> "
              f"{end[2]}; exit code {code}")
    odd = server_log_oddities(server.log_path)
    if odd:
        print(f"server log: {len(odd)} kinds of warning/error lines: " + "; ".join(odd[:8]))
    if procs_left:
        print(f"client processes that did not stop by themselves: {procs_left}")
    if interrupted_at is not None:
        print(f"interrupted at {interrupted_at:.0f} s of {soak.total_s:.0f}")
    try:
        plot(args.plot, fig, soak, updates)
        where = f"plot: {args.plot.resolve()}"
    except Exception as exc:  # noqa: BLE001 - the figures above stand without it
        where = f"plot not written: {type(exc).__name__}: {exc}"
    p99 = ", ".join(f"{t} {percentile_ms(hist.get(t), 99):.1f} ms" for t in TRANSPORTS)
    print(f"\nsoak {soak.total_s / 60:g} min: {total_ok} well-formed requests answered, "
          f"{failed} failed (target 0); p99 {p99}; RSS "
          f"{f'{start[0]:.0f} -> {end[0]:.0f} MB' if start and end else '?'}, open "
          f"descriptors {f'{start[1]} -> {end[1]} (max {max(fds)})' if start and end else '?'}"
          f"; updates applied {applied} of {len(published)} published "
          f"({', '.join(f'{k} {n}' for k, n in sorted(outcomes.items())) or 'none ended'}); "
          f"swaps {len(swaps_ok)} ({len(swaps_bad)} failed); malformed sent "
          f"{sum(n for k, n in events.items() if k[0] == 'malformed')}; server exit {code}")
    print(where)


if __name__ == "__main__":
    sys.exit(main())
