"""Report load on a real fleet server process: N devices each POST signed reports.

For benchmarks/fleet_sim.py --ingest: the fleet server runs as `outpost fleet serve` in a
process of its own (any checkout's: ``source`` names it, to compare before and after);
this process signs and POSTs, ``concurrency`` at a time over keep-alive connections. Each
simulated device sends what a real agent sends, one signed POST of its reports, with its
own key; only the device behind it is missing. Measured: reports per second over windows
of the run, the server's CPU seconds and its RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from updater.report_auth import device_key, sign

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, log_path: Path, timeout_s: float,
                   what: str = "the fleet server") -> None:
    """Until 127.0.0.1:``port`` accepts a connection; RuntimeError with the end of its log
    when ``proc`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log_path.read_text()[-3000:]}") from None
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start in {timeout_s:g} s: "
                       f"{log_path.read_text()[-3000:]}")


@dataclass
class ServerProcess:
    """`outpost fleet serve DIR` of the checkout at ``source``, on a free port."""

    directory: Path
    source: Path
    plan_check_s: float | None = None  # --plan-check-s, if given
    extra: tuple[str, ...] = ()  # more `fleet serve` arguments (--db URL)
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        self.log = open(self.directory / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "fleet", "serve", str(self.directory),
             "--port", str(self.port), "--timestamp-check-s", "0",
             *(["--plan-check-s", str(self.plan_check_s)] if self.plan_check_s else []),
             *self.extra],
            cwd=self.source, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.port, self.directory / "server.log", 60)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mib(self, peak: bool = False) -> float:
        key = "VmHWM:" if peak else "VmRSS:"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
            self.log.close()


def device_reports(device_id: str, rollout_id: str, states: list[str], ts: float) -> list:
    return [{"device_id": device_id, "model": "identity", "version": 2,
             "rollout_id": rollout_id, "state": state, "detail": "", "ts": ts + i * 1e-3,
             "labels": {"sensor": "camera"}} for i, state in enumerate(states)]


async def post_all(url: str, secret: bytes, rollout_id: str, devices: list[str],
                   states: list[str], concurrency: int = 32) -> list[float]:
    """Each device POSTs its reports once, signed; the monotonic time each POST ended."""
    import aiohttp  # noqa: PLC0415

    keys = {d: device_key(secret, d) for d in devices}
    done: list[float] = []
    queue = list(reversed(devices))
    refused: list[str] = []

    async def worker(session) -> None:
        while queue:
            d = queue.pop()
            body = json.dumps({"reports": device_reports(d, rollout_id, states,
                                                         time.time())}).encode()
            headers = {"Content-Type": "application/json", **sign(keys[d], d, body)}
            async with session.post(f"{url}/v1/reports", data=body, headers=headers) as r:
                answer = await r.read()
                if r.status != 200 or b'"ignored": [{' in answer:
                    refused.append(f"{d}: HTTP {r.status} {answer[:200]!r}")
            done.append(time.monotonic())

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    if refused:
        raise RuntimeError(f"{len(refused)} POSTs refused; first: {refused[0]}")
    return done


def window_rates(done: list[float], marks: list[int], per_post: int,
                 window: int = 500) -> dict[int, float]:
    """Reports a second over the ``window`` POSTs that ended at each mark."""
    out = {}
    for mark in marks:
        if mark <= len(done) and mark > window:
            out[mark] = window * per_post / (done[mark - 1] - done[mark - 1 - window])
    return out
