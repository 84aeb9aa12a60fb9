"""The fleet simulation: a real fleet server process and N device agents in this one.

Each simulated device is a real ``Agent`` (TUF ngclient refresh, HTTP downloads with
Range, TUF length/hash checks, its own SQLite journal and report queue, its own report
key) talking to the real fleet server (`outpost fleet serve`, a process of its own) over
HTTP on 127.0.0.1. How it differs from a real device: the appliance under it is
simulated (``SimHost``: versions in memory, validation with real ONNX Runtime sessions
shared by model hash the way a content-addressed engine cache is, and synthetic traffic
for the health watch, whose window is 0 s); devices poll in rounds, ``concurrency`` at a
time, each agent opened for its poll and closed after; and the clock is scaled (a plan's
soak of ``soak_s``, 0.5 s by default; the server judges plans every 0.1 s).

Scenario: every device installs v1 (so the fleet knows it); a good v2 goes out with a
rollout plan (1,5,25,100 by default) that the fleet server advances by itself until all
run it; then a bad v3 that yields NaN on the inputs seen by devices labelled
``sensor=thermal`` goes out with the same plan and is halted by the fleet at its first
stage; the devices that took it roll back or fall back to v2.

With ``shadow=True`` the bad release's rollout has a shadow phase: each device runs it
beside its active version on its own synthetic live traffic (``SimHost.shadow_snapshot``:
both sessions on the same rows, compared as the router does) and answers with it only if
it agreed, so the thermal devices reject it in shadow and never answer with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from updater.agent import Agent
from updater.config import UpdaterConfig
from updater.errors import ReleaseError, UpdaterError
from updater.fleet_db import FleetDB
from updater.fleet_repo import FleetRepo, init_repo
from updater.health import Health
from updater.ingest_load import ServerProcess
from updater.plans import Plan
from updater.report_auth import device_key
from updater.shadow import ShadowPolicy
from updater.validation import compare, make_release_samples, read_samples, run_session

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose fleet server runs
TRAFFIC_ROWS = 8  # requests a device serves between two health readings
SHADOW_ROWS = 32  # live requests a device serves (and copies) per shadow reading
SIM_SHADOW = ShadowPolicy(window_s=0.2, min_requests=SHADOW_ROWS, max_disagreement=0.01,
                          max_latency_ratio=2.0)


def log_guard_model(path: Path, width: int = 16) -> Path:
    """y = x + 0 * log(x + 10): equals x for x > -10, NaN below (the bad release)."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    from appliance.demo.models import save_model  # noqa: PLC0415

    ten = numpy_helper.from_array(np.full((width,), 10.0, np.float32), "ten")
    zero = numpy_helper.from_array(np.zeros((width,), np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ten"], ["s"]), helper.make_node("Log", ["s"], ["l"]),
         helper.make_node("Mul", ["l", "zero"], ["z"]), helper.make_node("Add", ["x", "z"],
                                                                         ["y"])],
        "log_guard", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[ten, zero])
    return save_model(graph, path)


class SessionCache:
    """ONNX Runtime sessions shared by every simulated device, keyed by model sha256."""

    def __init__(self) -> None:
        self.sessions: dict[str, object] = {}
        self.lock = threading.Lock()
        self.validated: dict[str, str] = {}  # sha -> "" (passed) or the error

    def session(self, model_file: Path):
        from engines import BuildOptions, RuntimeOptions  # noqa: PLC0415
        from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: PLC0415

        sha = hashlib.sha256(model_file.read_bytes()).hexdigest()
        with self.lock:
            if sha not in self.sessions:
                engine = OnnxRuntimeEngine()
                opts = BuildOptions(max_batch_size=32, opt_batch_size=8)
                art = engine.prepare(model_file, opts, Path(tempfile.mkdtemp()))
                self.sessions[sha] = engine.load(art, opts, RuntimeOptions())
            return sha, self.sessions[sha]


@dataclass
class SimHost:
    """One simulated appliance: versions in memory, traffic shaped by its labels."""

    cache: SessionCache
    thermal: bool
    versions: dict[int, Path] = field(default_factory=dict)  # version -> model file
    bad: set[int] = field(default_factory=set)
    current: int | None = None
    counts: dict[int, list[int]] = field(default_factory=dict)  # version -> [ok, failed]
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    shadow: int | None = None  # the version shadowing the active one
    shadow_stats: dict = field(default_factory=dict)
    # The device's data dir: versions are kept where the agent finds a delta's base
    # (models/<model>/<version>/model.onnx). None: under its staging folder.
    home: Path | None = None
    validated_at: dict[int, float] = field(default_factory=dict)  # version -> monotonic
    activated_at: dict[int, float] = field(default_factory=dict)

    def _traffic(self, rows: int) -> np.ndarray:
        # Thermal sensors report cold readings near -20; the others near 0.
        return (self.rng.standard_normal((rows, 16)) + (-20 if self.thermal else 0)
                ).astype(np.float32)

    def _serve(self, version: int, x: np.ndarray) -> np.ndarray:
        """Live requests answered by ``version``: counted as it answered them."""
        _, session = self.cache.session(self.versions[version])
        y = session.run({"x": x})["y"]
        ok = np.isfinite(y).all(axis=1)
        c = self.counts.setdefault(version, [0, 0])
        c[0] += int(ok.sum())
        c[1] += int((~ok).sum())
        return y

    async def start_shadow(self, model: str, version: int, sample: float) -> bool:
        self.shadow, self.shadow_stats = version, {"compared": 0, "agreed": 0}
        return True

    async def shadow_snapshot(self, model: str, version: int) -> dict | None:
        """Serve a little live traffic on the active version, its copies on the shadow,
        and compare them per request as the router does (within 1e-3/1e-4)."""
        if self.shadow != version or self.current is None:
            return None
        x = self._traffic(SHADOW_ROWS)
        live = self._serve(self.current, x)
        _, session = self.cache.session(self.versions[version])
        copy = session.run({"x": x})["y"]
        agree = np.isclose(live, copy, rtol=1e-3, atol=1e-4).all(axis=1)
        st = self.shadow_stats
        st["compared"] += SHADOW_ROWS
        st["agreed"] += int(agree.sum())
        return {**st, "errors": {}, "shed": 0, "latency_ms": {"p50": 1.0, "p99": 1.0},
                "live_latency_ms": {"p50": 1.0, "p99": 1.0}}

    async def end_shadow(self, model: str, version: int) -> None:
        if self.shadow == version:
            self.shadow = None

    def active(self, model: str) -> int | None:
        return self.current

    def has_version(self, model: str, version: int) -> bool:
        return version in self.versions

    def stage(self, model: str, version: int, folder: Path) -> None:
        if self.home is None:
            keep = folder.parent.parent / "kept" / f"{version}.onnx"  # staging/kept/
        else:
            keep = self.home / "models" / model / str(version) / "model.onnx"
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / "model.onnx", keep)  # moved in, as the repository does
        self.versions[version] = keep

    def prepare_and_validate(self, model: str, version: int, release_samples: Path,
                             fault=None) -> None:
        sha, session = self.cache.session(self.versions[version])
        with self.cache.lock:
            if sha not in self.cache.validated:
                inputs, expected = read_samples(release_samples)
                try:
                    compare(run_session(session, inputs), expected, 1e-3, 1e-4,
                            f"release {model} {version}")
                    self.cache.validated[sha] = ""
                except ReleaseError as exc:
                    self.cache.validated[sha] = str(exc)
        if self.cache.validated[sha]:
            raise ReleaseError(self.cache.validated[sha])
        self.validated_at[version] = time.monotonic()

    async def activate(self, model: str, version: int) -> None:
        self.current = version
        self.activated_at[version] = time.monotonic()

    def health(self, model: str, version: int | None) -> Health | None:
        """Serve a little traffic on ``version``, then read its cumulative figures."""
        if version is None or version != self.current:
            return None
        self._serve(version, self._traffic(TRAFFIC_ROWS))
        c = self.counts[version]
        return Health(c[0], c[1], 1.0)

    def mark_bad(self, model: str, version: int, why: str) -> None:
        self.bad.add(version)


class Simulation:
    def __init__(self, n_devices: int = 500, *, thermal_share: float = 0.3,
                 plan: tuple[float, ...] = (0.01, 0.05, 0.25, 1.0), soak_s: float = 0.5,
                 min_committed: float = 0.95, min_reports: int = 5,
                 failure_threshold: float = 0.1, workdir: Path | None = None,
                 concurrency: int = 64, shadow: bool = False, max_rounds: int = 12):
        self.n = n_devices
        self.shadow = shadow  # the bad release's rollout has a shadow phase
        self.halted_at: float | None = None
        self.plan = Plan(tuple(plan), soak_s, min_committed)
        self.plan.check()
        self.canary = plan[0]
        self.min_reports = min_reports
        self.failure_threshold = failure_threshold
        self.thermal_share = thermal_share
        self.max_rounds = max_rounds
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.work = Path(workdir or tempfile.mkdtemp(prefix="outpost-sim-", dir=base))
        self.concurrency = concurrency
        self.timeline: list[str] = []
        self.t0 = time.monotonic()

    def note(self, text: str) -> None:
        line = f"t={time.monotonic() - self.t0:7.2f}s  {text}"
        self.timeline.append(line)
        print(line, flush=True)

    def counts(self) -> dict[str, int]:
        c = Counter(f"v{h.current}" for h in self.hosts)
        return dict(sorted(c.items()))

    async def round(self, label: str) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        errors: Counter = Counter()
        first: dict[str, str] = {}

        async def one(cfg: UpdaterConfig, home: Path, host: SimHost) -> None:
            async with sem:
                # A device's agent is opened for its poll and closed after (its journal,
                # metadata and report queue stay on disk): 10,000 open journals would
                # pass this host's 20,000 open files.
                agent = Agent(cfg, home, host)
                try:
                    await agent.check_once()
                except UpdaterError as exc:
                    errors[type(exc).__name__] += 1
                    first.setdefault(type(exc).__name__, str(exc))
                finally:
                    agent.close()

        t = time.monotonic()
        await asyncio.gather(*(one(*d) for d in self.devices))
        extra = f", errors {dict(errors)} (first: {first})" if errors else ""
        self.note(f"{label}: poll round over {self.n} devices in "
                  f"{time.monotonic() - t:.2f}s -> {self.counts()}{extra}")

    def publish(self, version: int, model: Path) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.work))
        config, samples = make_release_samples(model, None, None, tmp)
        self.repo.publish("identity", version, model, config, samples)

    async def _watch_fleet(self) -> None:
        """Note what the fleet server does by itself: stages advanced, halts."""
        seen: dict[int, tuple] = {}
        while True:
            for rel in await asyncio.to_thread(self.repo.releases):
                r = rel.rollout
                if r is None:
                    continue
                now = (r.id, r.fraction, r.state)
                old = seen.get(rel.version)
                seen[rel.version] = now
                if old is None or old[0] != r.id:
                    continue
                if old[1] != r.fraction:
                    self.note(f"fleet: advanced identity v{rel.version} to {r.fraction:.0%} "
                              f"by itself")
                if old[2] != "halted" and r.state == "halted":
                    if rel.version == 3:
                        self.halted_at = time.monotonic() - self.t0
                    why = _last_line(self.server_log, f"rollout of identity {rel.version} "
                                                      f"halted: ")
                    self.note(f"fleet: halted identity v{rel.version} by itself: {why}")
            await asyncio.sleep(0.05)

    async def until(self, label: str, done) -> int:
        """Poll rounds until ``done()`` (the planner works between them); the rounds run."""
        for n in range(1, self.max_rounds + 1):
            self._stage_moved()  # what the fleet holds as the round starts
            await self.round(f"{label}, round {n}")
            deadline = time.monotonic() + self.plan.soak_s + 2.0  # the stage may advance
            while not done() and time.monotonic() < deadline:
                if self._stage_moved():
                    break
                await asyncio.sleep(0.05)
            if done():
                return n
        return self.max_rounds

    def _stage_moved(self) -> bool:
        fractions = tuple((r.version, r.rollout.fraction, r.rollout.state)
                          for r in self.repo.releases() if r.rollout)
        moved = fractions != getattr(self, "_fractions", None)
        self._fractions = fractions
        return moved

    async def run(self) -> dict:
        from appliance.demo.models import identity_model  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        # Agents block a worker thread each while they wait on the fleet server.
        loop.set_default_executor(ThreadPoolExecutor(self.concurrency + 16))
        init_repo(self.work / "fleet")
        self.repo = FleetRepo(self.work / "fleet")
        cache = SessionCache()
        good = identity_model(self.work / "identity.onnx")
        self.publish(1, good)
        self.repo.set_rollout("identity", 1, new=True, fraction=1.0)
        # The real fleet server, in a process of its own (its CPU and RSS are its own),
        # judging planned rollouts every 0.1 s: the soak is scaled to the simulation.
        server = ServerProcess(self.work / "fleet", ROOT, plan_check_s=0.1).start()
        self.server_log = self.work / "fleet" / "server.log"
        url = server.url
        secret = self.repo.report_secret()  # each device signs its reports with its key
        self.hosts, self.devices = [], []
        rng = np.random.default_rng(7)
        thermal_count = 0
        for i in range(self.n):
            thermal = bool(rng.random() < self.thermal_share)
            thermal_count += thermal
            host = SimHost(cache, thermal, rng=np.random.default_rng(i))
            device_id = f"sim-{i:05d}"
            home = self.work / "devices" / f"{i:05d}"
            home.mkdir(parents=True, exist_ok=True)
            (home / "report.key").write_text(device_key(secret, device_id).hex())
            cfg = UpdaterConfig(
                fleet_url=url, trusted_root=str(self.repo.metadata_dir / "1.root.json"),
                device_id=device_id, report_key_file=str(home / "report.key"),
                labels={"sensor": "thermal" if thermal else "camera"},
                health_window_s=0.0, health_max_error_rate_increase=0.05)
            self.hosts.append(host)
            self.devices.append((cfg, home, host))
        self.note(f"fleet server on {url} (pid {server.proc.pid}); {self.n} devices "
                  f"({thermal_count} labelled sensor=thermal); {self.plan.describe()} "
                  f"(soak scaled)")
        watcher = asyncio.create_task(self._watch_fleet())
        cpu0 = server.cpu_s()
        try:
            await self.round("first install of v1 (the fleet learns its devices)")
            self.publish(2, identity_model(self.work / "identity-2.onnx"))
            r2 = self.repo.set_rollout("identity", 2, new=True, fraction=self.canary,
                                       min_reports=self.min_reports,
                                       failure_threshold=self.failure_threshold,
                                       plan=self.plan)
            self.note(f"operator: rollout v2 with {self.plan.describe()} (rollout {r2.id})")
            v2_rounds = await self.until("v2", lambda: all(h.current == 2
                                                           for h in self.hosts))
            self.publish(3, log_guard_model(self.work / "bad-3.onnx"))
            r = self.repo.set_rollout("identity", 3, new=True, fraction=self.canary,
                                      failure_threshold=self.failure_threshold,
                                      min_reports=self.min_reports, plan=self.plan,
                                      shadow=SIM_SHADOW if self.shadow else None)
            self.note(f"operator: rollout v3 (bad on thermal sensors) with "
                      f"{self.plan.describe()} (rollout {r.id})"
                      + (f", {SIM_SHADOW.describe()}" if self.shadow else ", no shadow phase"))
            v3_start = time.monotonic() - self.t0
            await self.until("v3", lambda: self.repo.release("identity", 3).rollout.state
                             == "halted")
            await self.round("after the halt")
            cpu = server.cpu_s() - cpu0
            wall = time.monotonic() - self.t0
            with FleetDB(self.repo.dir / "fleet.db") as db:
                reports = db.db["reports"].count
                fleet_status = db.counts()
                v3_shadow = db.shadow_summary(r.id) if self.shadow else None
            rel = self.repo.release("identity", 3)
            summary = {
                "devices": self.n, "final_counts": self.counts(), "v2_rounds": v2_rounds,
                "v2_fraction": self.repo.release("identity", 2).rollout.fraction,
                "v3_state": rel.rollout.state, "v3_fraction": rel.rollout.fraction,
                "v3_cohort": sum(rel.rollout.includes(cfg.device_id, cfg.labels)
                                 for cfg, _, _ in self.devices),
                "v3_installed": sum(3 in h.versions for h in self.hosts),
                "v3_marked_bad": sum(3 in h.bad for h in self.hosts),
                "v3_took_then_left": sum(3 in h.counts for h in self.hosts),
                # Live requests v3 answered, and how many of those answers were NaN.
                "v3_live_answers": sum(sum(h.counts.get(3, (0, 0))) for h in self.hosts),
                "v3_bad_answers": sum(h.counts.get(3, (0, 0))[1] for h in self.hosts),
                "v3_devices_bad_answers": sum(h.counts.get(3, (0, 0))[1] > 0
                                              for h in self.hosts),
                "v3_devices_reported_failure": sum(
                    v for k, v in fleet_status.get(r.id, {}).items()
                    if k in ("failed", "rolled_back", "rejected_in_shadow")),
                "v3_halted_at_s": None if self.halted_at is None
                else round(self.halted_at - v3_start, 2),
                "v3_shadow": v3_shadow,
                "fleet_status": fleet_status,
                "reports": reports, "server_cpu_s": round(cpu, 2),
                "server_rss_mib": round(server.rss_mib(), 1),
                "server_peak_rss_mib": round(server.rss_mib(peak=True), 1),
                "wall_s": round(wall, 1),
            }
            self.note(f"final: {summary['final_counts']}; v3 rollout {summary['v3_state']} "
                      f"at {rel.rollout.fraction:.0%}, cohort {summary['v3_cohort']} devices, "
                      f"{summary['v3_installed']} installed it, "
                      f"{summary['v3_took_then_left']} answered with v3, "
                      f"{summary['v3_marked_bad']} marked it bad ("
                      + ("rejected in shadow" if self.shadow else "rolled back") + "); "
                      f"v3 gave {summary['v3_bad_answers']} NaN answers to live requests")
            return summary
        finally:
            watcher.cancel()
            server.stop()


def _last_line(log: Path, marker: str) -> str:
    """What follows ``marker`` on the last log line holding it."""
    try:
        lines = [ln for ln in log.read_text().splitlines() if marker in ln]
    except OSError:
        return ""
    return lines[-1].split(marker, 1)[1] if lines else ""
