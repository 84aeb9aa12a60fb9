"""The fleet simulation on the links and sites devices really have (issue 24): a share of
the devices on a slow link that drops every few hundred KB, and a release that may only
be activated in a maintenance window. Run once with a delta release and once without,
it shows what deltas buy: bytes moved and the time until every device runs the release.

As in ``updater/sim.py``: one real fleet server process, every device a real ``Agent``
(TUF, ranged resumable downloads, deltas, its journal and signed reports) over HTTP on
127.0.0.1, its appliance a ``SimHost``. Here each device polls on its own (every
``poll_s``, not in rounds: a device on the slow link does not hold the others up), the
slow ones through a ``SlowDroppingLink`` relay (reports go straight to the fleet server:
the relay passes GETs only), and every device reads the same scaled local clock, which
starts at ``START`` when the release is rolled out and runs ``clock_scale`` times faster
than the wall clock: the window 02:00-04:00 opens one simulated minute later.

Scenario: every device holds v1 (a 2 MB model). v2 retrains its head only; it is
published with an activation window (and, for the delta run, ``--delta-from 1``) and rolled
out to the whole fleet at once. Each device downloads it (a delta where it can), validates
it, waits for the window, activates. Measured: the target bytes the devices received
(what the links carried; resumed chunks counted again), the same by the fleet's own
count (``fleet status``: bytes as deltas and as full files), when the last device was
ready and when the last one activated (wall seconds after the rollout, and the simulated
local time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from updater.activation import ActivationPolicy
from updater.agent import Agent
from updater.config import UpdaterConfig
from updater.errors import UpdaterError
from updater.fetcher import Fetcher
from updater.fleet_repo import FleetRepo, init_repo
from updater.ingest_load import ServerProcess
from updater.link_relay import SlowDroppingLink
from updater.report_auth import device_key
from updater.sim import ROOT, SessionCache, SimHost
from updater.validation import make_release_samples

START = datetime(2025, 3, 3, 1, 59)  # local time on every device when v2 is rolled out
WINDOW = "02:00-04:00"


def layered_model(path: Path, head_seed: int = 1, hidden: int = 1024, mid: int = 512
                  ) -> Path:
    """y = ((x @ w1) @ w2) @ head over 16 inputs: 2 MB of weights, most in w2; another
    ``head_seed`` retrains only the 32 KB head."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    from appliance.demo.models import save_model  # noqa: PLC0415

    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, hidden)) / math.sqrt(16)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, mid)) / math.sqrt(hidden)).astype(np.float32)
    head = (np.random.default_rng(head_seed).standard_normal((mid, 16)) / math.sqrt(mid)
            ).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h1"]),
         helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
         helper.make_node("MatMul", ["h2", "head"], ["y"])], "layered",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(w, n) for w, n in
                     ((w1, "w1"), (w2, "w2"), (head, "head"))])
    return save_model(graph, path)


class ScaledClock:
    """Local time that starts at ``start`` now and runs ``scale`` times the wall clock."""

    def __init__(self, start: datetime, scale: float):
        self.start, self.scale = start, scale
        self.t0 = time.monotonic()

    def __call__(self) -> datetime:
        return self.start + timedelta(seconds=(time.monotonic() - self.t0) * self.scale)

    def wall_s(self, local: datetime) -> float:
        """Wall seconds after the start at which the clock reads ``local``."""
        return (local - self.start).total_seconds() / self.scale


class CountingFetcher(Fetcher):
    """The agent's fetcher, counting the target bytes it receives under ``key``."""

    def __init__(self, counts: Counter, key: str, *args):
        super().__init__(*args)
        self.counts, self.key = counts, key

    def fetch_from(self, url: str, offset: int):
        start, chunks = super().fetch_from(url, offset)

        def counted():
            for chunk in chunks:
                self.counts[self.key] += len(chunk)
                yield chunk
        return start, counted()


class LinkScenario:
    def __init__(self, n_devices: int = 100, *, slow_share: float = 0.1,
                 deltas: bool = True, slow_bytes_per_s: int = 200_000,
                 drop_every: int = 300_000, clock_scale: float = 10.0, poll_s: float = 1.0,
                 concurrency: int = 32, time_limit_s: float = 600.0,
                 workdir: Path | None = None):
        self.n = n_devices
        self.n_slow = round(n_devices * slow_share)
        self.deltas = deltas
        self.slow_bytes_per_s, self.drop_every = slow_bytes_per_s, drop_every
        self.clock_scale, self.poll_s = clock_scale, poll_s
        self.concurrency, self.time_limit_s = concurrency, time_limit_s
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.work = Path(workdir or tempfile.mkdtemp(prefix="outpost-links-", dir=base))
        self.t0 = time.monotonic()
        self.received: Counter = Counter()  # "slow" | "fast" -> target bytes received
        self.errors: Counter = Counter()

    def note(self, text: str) -> None:
        print(f"t={time.monotonic() - self.t0:7.2f}s  {text}", flush=True)

    def _publish(self, repo: FleetRepo, version: int, model: Path, **kw) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.work))
        config, samples = make_release_samples(model, None, None, tmp)
        repo.publish("identity", version, model, config, samples, **kw)

    def _devices(self, repo: FleetRepo, url: str, slow_url: str, v1: Path):
        """(config, data dir, host, slow?) of each device, every one holding v1."""
        cache = SessionCache()
        secret = repo.report_secret()
        out = []
        for i in range(self.n):
            slow = i < self.n_slow
            device_id = f"{'slow' if slow else 'fast'}-{i:05d}"
            home = self.work / "devices" / f"{i:05d}"
            held = home / "models" / "identity" / "1" / "model.onnx"
            held.parent.mkdir(parents=True)
            held.write_bytes(v1.read_bytes())
            (home / "report.key").write_text(device_key(secret, device_id).hex())
            host = SimHost(cache, thermal=False, rng=np.random.default_rng(i), home=home,
                           versions={1: held}, current=1)
            cfg = UpdaterConfig(
                fleet_url=slow_url if slow else url, report_url=url,
                trusted_root=str(repo.metadata_dir / "1.root.json"), device_id=device_id,
                report_key_file=str(home / "report.key"), health_window_s=0.0)
            out.append((cfg, home, host, slow))
        return out

    async def _device(self, cfg, home, host, slow, clock, sem, deadline) -> None:
        """One device polling on its own until it runs v2 (or the time limit)."""
        while host.current != 2 and time.monotonic() < deadline:
            async with sem:
                agent = Agent(cfg, home, host, clock=clock, fetcher=CountingFetcher(
                    self.received, "slow" if slow else "fast", cfg.http_timeout_s,
                    cfg.download_chunk_bytes))
                try:
                    await agent.check_once()
                except UpdaterError as exc:
                    self.errors[type(exc).__name__] += 1
                finally:
                    agent.close()
            if host.current != 2:
                await asyncio.sleep(self.poll_s)

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(self.concurrency + 16))
        init_repo(self.work / "fleet")
        repo = FleetRepo(self.work / "fleet")
        v1 = layered_model(self.work / "v1.onnx", head_seed=1)
        v2 = layered_model(self.work / "v2.onnx", head_seed=2)  # the head retrained
        self._publish(repo, 1, v1)
        repo.set_rollout("identity", 1, new=True, fraction=1.0)
        self._publish(repo, 2, v2, delta_from=(1,) if self.deltas else (),
                      activation=ActivationPolicy(window=WINDOW))
        full = _release_size(repo)
        self.delta_bytes = _delta_size(repo) if self.deltas else None
        server = ServerProcess(self.work / "fleet", ROOT).start()
        link = SlowDroppingLink(server.port, self.slow_bytes_per_s, self.drop_every).start()
        devices = self._devices(repo, server.url, link.url, v1)
        self.note(f"fleet server on {server.url}; {self.n} devices hold v1, {self.n_slow} "
                  f"of them behind a link of {self.slow_bytes_per_s:,} B/s that drops "
                  f"every {self.drop_every:,} bytes; v2 is {full:,} bytes"
                  + (f", its delta from v1 {self.delta_bytes:,}" if self.deltas
                     else ", published without a delta")
                  + f"; activation window {WINDOW}, local clock x{self.clock_scale:g} "
                  f"from {START:%H:%M}")
        try:
            repo.set_rollout("identity", 2, new=True, fraction=1.0)
            t_rollout = time.monotonic()
            clock = ScaledClock(START, self.clock_scale)
            sem = asyncio.Semaphore(self.concurrency)
            deadline = t_rollout + self.time_limit_s
            await asyncio.gather(*(self._device(*d, clock, sem, deadline) for d in devices))
            status = _status_row(server.url, 2)
            summary = self._summary(devices, t_rollout, clock, full, status, link)
        finally:
            link.shutdown()
            link.server_close()
            server.stop()
        self.note(f"{'with' if self.deltas else 'without'} deltas: "
                  f"{summary['bytes_moved']:,} bytes moved, all {summary['on_v2']} on v2 "
                  f"{summary['time_to_100_s']} s after the rollout")
        return summary

    def _summary(self, devices, t_rollout, clock, full, status, link) -> dict:
        def after(times: list[float]) -> float | None:
            return round(max(times) - t_rollout, 2) if times else None

        hosts = [(host, slow) for _, _, host, slow in devices]
        done = [h.activated_at[2] for h, _ in hosts if 2 in h.activated_at]
        last = after(done)
        return {
            "deltas": self.deltas, "devices": self.n, "slow_devices": self.n_slow,
            "release_bytes": full, "delta_bytes": self.delta_bytes,
            "on_v2": sum(h.current == 2 for h, _ in hosts),
            "bytes_moved": self.received["slow"] + self.received["fast"],
            "bytes_slow_links": self.received["slow"],
            "bytes_fast_links": self.received["fast"],
            "slow_link_sent": link.sent,  # what the relay sent (metadata too)
            "link_breaks": link.breaks,
            "fleet_downloads": status["downloads"] if status else None,
            "window_opens_s": round(clock.wall_s(START.replace(hour=2, minute=0)), 2),
            "all_ready_s": after([h.validated_at[2] for h, _ in hosts
                                  if 2 in h.validated_at]),
            "slow_ready_s": after([h.validated_at[2] for h, s in hosts
                                   if s and 2 in h.validated_at]),
            "time_to_100_s": last,
            "local_time_at_100": None if last is None else
            f"{START + timedelta(seconds=last * self.clock_scale):%H:%M:%S}",
            "errors": dict(self.errors),
        }


def _release_size(repo: FleetRepo) -> int:
    from updater.fleet_repo import release_path  # noqa: PLC0415

    return repo.target_file(release_path("identity", 2)).stat().st_size


def _delta_size(repo: FleetRepo) -> int:
    from updater.fleet_repo import delta_path  # noqa: PLC0415

    return repo.target_file(delta_path("identity", 2, 1)).stat().st_size


def _status_row(url: str, version: int) -> dict | None:
    """The fleet server's /v1/status row of identity ``version``."""
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"{url}/v1/status", timeout=10) as resp:
            for row in json.loads(resp.read()):
                if row["model"] == "identity" and row["version"] == version:
                    return row
    return None
