"""The model manager: which versions should be loaded, which one is active, and the hot
swap between versions (Triton's repository manager and model lifecycle).

Decisions live here; the work of loading and running lives in ``loaded`` (one version)
and ``ensemble``; which version answers a request is the router's (serving/router.py).
Everything runs on the event loop; ``activate`` holds a per-model lock
so swaps of one model happen one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from appliance.config.profiles import resolve
from appliance.config.schema import Config
from appliance.errors import (
    FailedPrecondition,
    NotFound,
    OutpostError,
    ResourceExhausted,
)
from appliance.models.ensemble import EnsembleVersion
from appliance.models.layout import want_for
from appliance.models.loaded import LoadedVersion, weights_bytes
from appliance.models.model_config import ModelConfig
from appliance.models.repository import Repository, VersionRecord
from appliance.models.residency import EvictionLog
from appliance.models.traffic import TrafficPolicy
from appliance.models.versions import ServedVersion, StoredVersion, VersionState
from appliance.observe import memory
from engines import Engine, RuntimeOptions

log = logging.getLogger("outpost.models")


def _mib(n: int) -> int:
    return round(n / (1 << 20))


class BudgetTooSmall(FailedPrecondition):
    """A version that cannot fit the memory budget even alone."""


# States in which a version in ``loaded`` no longer takes requests: routing loads it anew.
NOT_SERVING = frozenset((VersionState.UNLOADING, VersionState.UNLOADED))


class ModelManager:
    def __init__(self, repo: Repository, engine: Engine, config: Config):
        self.repo = repo
        self.engine = engine
        self.config = config
        # each version's threads and spinning are its layout's (models/layout.py)
        self.runtime = RuntimeOptions(inter_op_threads=config.threads.inter_op)
        self.loaded: dict[tuple[str, int], ServedVersion] = {}
        self.active: dict[str, int] = {}
        self.traffic: dict[str, TrafficPolicy] = {}
        self.budget_bytes = config.residency.memory_budget_mb << 20
        self.evictions = EvictionLog()
        self.measured: dict[tuple[str, int], int] = {}  # bytes at the last load, per version
        # The budget covers the whole process: what it holds before any model (the
        # interpreter, libraries, the engine's runtime, imported now) counts first
        engine.version()
        self.baseline_bytes = memory.settled_resident_bytes()
        # versions the budget cannot hold even alone: a start-up error (app.serve)
        self.unfit: dict[tuple[str, int], str] = {}
        self.profile = resolve(config.profile).profile  # its build fields, for every model
        self.unload_timeout_s = config.server.drain_timeout_s
        self._configs: dict[str, ModelConfig] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: dict[tuple[str, int], asyncio.Task] = {}

    # -- what should be served -----------------------------------------------------------

    def model_config(self, name: str) -> ModelConfig:
        """The model-level settings: those of the active version's config."""
        cfg = self._configs.get(name)
        if cfg is None:
            cfg = self.repo.version(name, self.active[name]).config()
            self._configs[name] = cfg
        return cfg

    def resident_versions(self, name: str) -> set[int]:
        """Versions servable now: the active one, the version policy's, the traffic's."""
        if name not in self.active:
            return set()
        out = {self.active[name]}
        policy = self.model_config(name).version_policy
        ready = [v.version for v in self.repo.model(name).versions if v.state == "ready"]
        if policy.kind == "all":
            out.update(ready)
        elif policy.kind == "latest":
            out.update(sorted(ready)[-policy.latest:])
        elif policy.kind == "specific":
            out.update(v for v in policy.versions if v in ready)
        if name in self.traffic:
            out.update(self.traffic[name].versions())
        return out

    def _servable(self, name: str, version: int) -> VersionRecord:
        if version not in self.resident_versions(name):
            served = ", ".join(map(str, sorted(self.resident_versions(name))))
            try:
                self.repo.version(name, version)
            except NotFound:
                raise NotFound(f"model '{name}' has no version {version}; served: "
                               f"{served}") from None
            raise NotFound(f"version {version} of model '{name}' is not served (served: "
                           f"{served}); activate it or widen the model's version_policy")
        return self.repo.version(name, version)

    # -- loading -------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model's resident versions (ensembles after their members); a version
        that fails is logged and leaves its model not ready."""
        if self.budget_bytes and self.baseline_bytes >= self.budget_bytes:
            raise BudgetTooSmall(
                f"the process holds {_mib(self.baseline_bytes)} MiB before any model loads "
                f"but residency.memory_budget_mb is {_mib(self.budget_bytes)}; the budget "
                f"covers the whole process: raise it")
        models = self.repo.models()
        for m in models:
            if m.active_version is not None:
                self.active[m.name] = m.active_version
                self._refresh_traffic(m.name)
        plain, ensembles = [], []
        for m in models:
            if m.name not in self.active:
                continue
            cfg = self.model_config(m.name)
            if cfg.load == "lazy":
                continue
            (ensembles if cfg.ensemble is not None else plain).append(m.name)
        for name in plain + ensembles:
            for version in sorted(self.resident_versions(name)):
                try:
                    await self.ensure_loaded(name, version)
                except OutpostError:
                    continue
        if self.unfit:
            raise BudgetTooSmall("; ".join(self.unfit.values()))

    def lookup(self, name: str, version: int) -> ServedVersion:
        """The version's server-side object, starting its load if it is servable but not
        loaded (lazy loading, or unloaded to stay within the memory budget)."""
        lv = self.loaded.get((name, version))
        if lv is not None and lv.state not in NOT_SERVING:
            return lv
        record = self._servable(name, version)
        return self._start_load(record)

    def _start_load(self, record: VersionRecord) -> ServedVersion:
        key = (record.model, record.version)
        config = record.config()
        if config.ensemble is not None:
            lv: ServedVersion = EnsembleVersion(record, config, self)
        else:
            lv = LoadedVersion(record, config, self.engine.kind)
            lv.room_for_instance = self._room_for_instance
        self.loaded[key] = lv
        task = asyncio.get_running_loop().create_task(self._load(lv))
        self._loading[key] = task
        task.add_done_callback(lambda t: self._loading.pop(key, None))
        return lv

    async def _load(self, lv: ServedVersion) -> None:
        t0 = time.monotonic()
        key = (lv.name, lv.version)
        try:
            if isinstance(lv, LoadedVersion):
                # planned with this version's last measure (the weights before its first)
                await self._make_room(lv, self.measured.get(key) or weights_bytes(lv.record))
                await lv.load(self.engine, self.repo.engines_dir, self.runtime, self.profile,
                              want_for(lv.config, self.config, self.engine.kind),
                              self.config.warmup.budget_ms / 1e3)
                self.measured[key] = lv.memory_bytes
                try:  # now measured: does it fit?
                    await self._make_room(lv, 0)
                except OutpostError:
                    await lv.unload(self.unload_timeout_s)
                    raise
            else:
                await lv.load()
        except OutpostError as exc:
            if lv.state is not VersionState.FAILED:
                lv._fail(str(exc))
            if isinstance(exc, BudgetTooSmall):
                self.unfit[(lv.name, lv.version)] = str(exc)
            log.error("load failed", extra={"model": lv.name, "version": lv.version,
                                            "error": lv.error})
            return
        self.evictions.loaded((lv.name, lv.version))
        self.unfit.pop((lv.name, lv.version), None)
        layout = getattr(lv, "layout", None)
        if layout is not None:
            self.repo.record_layout(lv.name, lv.version, layout.as_dict())
        log.info("model loaded", extra={
            "model": lv.name, "version": lv.version, "engine": lv.engine_kind,
            "load_s": round(time.monotonic() - t0, 3), "memory_mb": _mib(lv.memory_bytes),
            **({"layout": layout.describe()} if layout is not None else {})})

    async def ensure_loaded(self, name: str, version: int) -> ServedVersion:
        """Load (or find loaded) a version and wait until it is READY."""
        lv = self.loaded.get((name, version))
        if lv is None or lv.state in (VersionState.FAILED, VersionState.UNLOADING,
                                      VersionState.UNLOADED):
            record = self.repo.version(name, version)
            if record.state != "ready":
                raise FailedPrecondition(f"model '{name}' version {version} is marked "
                                         f"{record.state}; it can't be loaded")
            lv = self._start_load(record)
        task = self._loading.get((name, version))
        if task is not None:
            await asyncio.shield(task)
        if lv.state is not VersionState.READY:
            raise FailedPrecondition(lv.error or f"model '{name}' version {version} is "
                                                 f"{lv.state.value}")
        return lv

    async def load_version(self, record: VersionRecord) -> ServedVersion:
        """Load a version whatever the policies say (the caller decides it is wanted)."""
        return await self.ensure_loaded(record.model, record.version)

    async def _make_room(self, lv: ServedVersion, need: int) -> None:
        """Unload least recently used idle versions until ``need`` more bytes of ``lv``
        fit the budget beside the process's baseline and what every loaded version holds
        (``lv``'s own measured bytes included). A version a request waits on is never
        unloaded: then RESOURCE_EXHAUSTED. More than the budget even alone:
        ``BudgetTooSmall``."""
        if not self.budget_bytes:
            return
        own = lv.memory_bytes + need
        if self.baseline_bytes + own > self.budget_bytes:
            raise BudgetTooSmall(self._too_small(lv, own))
        while True:
            others = [v for v in self.loaded.values() if v is not lv and v.state in (
                VersionState.READY, VersionState.LOADING)]
            used = self.baseline_bytes + sum(v.memory_bytes for v in others)
            if used + own <= self.budget_bytes:
                return
            idle = [v for v in others if v.state is VersionState.READY
                    and not v.inflight_count() and not getattr(v, "pinned", False)]
            if not idle:
                raise ResourceExhausted(
                    f"model '{lv.name}' version {lv.version} needs {_mib(own)} MiB but "
                    f"{_mib(used)} of the {_mib(self.budget_bytes)} MiB memory budget are "
                    f"held by the process and busy versions; raise "
                    f"residency.memory_budget_mb or retry when idle")
            victim = min(idle, key=lambda v: v.last_used)
            reason = (f"memory budget: made room for {lv.name}:{lv.version}, which needs "
                      f"{_mib(own)} MiB")
            log.info("unloading to stay within the memory budget", extra={
                "model": victim.name, "version": victim.version,
                "for": f"{lv.name}:{lv.version}", "freed_mb": _mib(victim.memory_bytes)})
            self.loaded.pop((victim.name, victim.version), None)
            self.evictions.evicted((victim.name, victim.version), reason)
            await victim.unload(self.unload_timeout_s)
            # what it freed goes back to the system now, not at the next periodic trim
            await asyncio.to_thread(memory.trim)

    def _too_small(self, lv: ServedVersion, cost: int) -> str:
        measured = getattr(lv, "instance_bytes", 0)
        how = (f"measured: {lv.instance_count} instance(s) x {_mib(measured)} MiB"
               if measured else "its weights, not yet measured")
        return (f"model '{lv.name}' version {lv.version} costs {_mib(cost)} MiB ({how}) and "
                f"the process {_mib(self.baseline_bytes)} MiB before any model, but "
                f"residency.memory_budget_mb is {_mib(self.budget_bytes)}: it cannot fit "
                f"even alone; raise the budget to at least "
                f"{_mib(self.baseline_bytes + cost) + 1} or lower the model's instances "
                f"or max_batch_size")

    async def _room_for_instance(self, lv: LoadedVersion) -> None:
        """Room for one more instance of ``lv`` (a scale-up), measured like the last."""
        await self._make_room(lv, lv.instance_bytes)

    def residency(self) -> dict:
        """The memory account: the budget, the process's baseline, what each version
        holds (measured), and the evictions, for the stats op, /metrics and the CLI."""
        versions = []
        keys = sorted(set(self.loaded) | set(self.evictions.keys()))
        for key in keys:
            lv = self.loaded.get(key)
            versions.append({
                "model": key[0], "version": key[1],
                "state": lv.state.value if lv is not None else "unloaded",
                "memory_bytes": lv.memory_bytes if lv is not None else 0,
                "instance_bytes": getattr(lv, "instance_bytes", 0),
                "last_measured_bytes": self.measured.get(key, 0),  # at its latest load
                "instances": getattr(lv, "instance_count", 0),
                **self.evictions.of(key).as_dict()})
        accounted = self.baseline_bytes + sum(v["memory_bytes"] for v in versions)
        return {"budget_bytes": self.budget_bytes, "baseline_bytes": self.baseline_bytes,
                "accounted_bytes": accounted, "resident_bytes": memory.resident_bytes(),
                "versions": versions}

    async def unload(self, name: str, version: int | None = None) -> list[int]:
        """Unload one version, or every loaded version of a model; returns those unloaded."""
        keys = [k for k in self.loaded if k[0] == name and (version is None or k[1] == version)]
        if not keys:
            raise NotFound(f"model '{name}'{f' version {version}' if version else ''} is not "
                           f"loaded")
        for k in keys:
            lv = self.loaded.pop(k)
            await lv.unload(self.unload_timeout_s)
        return sorted(k[1] for k in keys)

    async def stop_serving(self, name: str) -> list[int]:
        """Take ``name`` out of routing (its requests get NOT_FOUND instead of loading it
        back lazily, as Triton's explicit model control does) and unload its versions;
        queued requests still finish. Until ``start_serving`` or a restart."""
        self.repo.model(name)  # NOT_FOUND for a model not in the repository
        self.active.pop(name, None)
        if any(n == name for n, _ in self.loaded):
            return await self.unload(name)
        return []

    async def start_serving(self, name: str, version: int | None = None) -> ServedVersion:
        """Serve ``name`` again (its repository's active version unless ``version``
        says otherwise), loaded and READY when this returns."""
        if version is None:
            record = self.repo.model(name)
            if record.active_version is None:
                raise NotFound(f"model '{name}' has no active version to load")
            version = record.active_version
            self.active.setdefault(name, version)
        return await self.ensure_loaded(name, version)

    async def unload_all(self) -> None:
        loaded, self.loaded = list(self.loaded.values()), {}
        await asyncio.gather(*(lv.unload(self.unload_timeout_s) for lv in loaded))

    # -- routing -------------------------------------------------------------------------

    def get(self, name: str, version: int | None = None, *, load: bool = True
            ) -> ServedVersion:
        """A version by name (the active one when ``version`` is None). ``load=False``:
        a servable version that is not loaded is described from its stored config
        (``StoredVersion``, not ready) instead of being loaded: metadata and readiness
        probes must not load a lazy model. Ensembles describe themselves once loaded."""
        if name not in self.active:
            raise NotFound(f"model '{name}' is not served here; the 'models' op lists what is")
        v = self.active[name] if version is None else version
        if not load:
            lv = self.loaded.get((name, v))
            if lv is None or lv.state in (VersionState.UNLOADING, VersionState.UNLOADED):
                record = self._servable(name, v)
                config = record.config()
                if config.ensemble is None:
                    return StoredVersion(record, config, self.engine.kind)
        return self.lookup(name, v)

    def member(self, name: str, version: int | None) -> ServedVersion:
        """A version an ensemble runs: loaded on demand, whatever the version policy."""
        if name not in self.active:
            raise NotFound(f"model '{name}' is not served here")
        v = version if version is not None else self.active[name]
        lv = self.loaded.get((name, v))
        if lv is not None and lv.state not in (VersionState.UNLOADING, VersionState.UNLOADED,
                                               VersionState.FAILED):
            return lv
        return self._start_load(self.repo.version(name, v))

    # -- changing what is served ----------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def activate(self, name: str, version: int) -> dict:
        """Hot swap: load and warm ``version``, switch to it between requests, let the old
        version finish what was routed to it, then unload it. A version that fails to
        load leaves the old one serving; the error says why."""
        async with self._lock(name):
            record = self.repo.version(name, version)
            if record.state != "ready":
                raise FailedPrecondition(
                    f"model '{name}' version {version} is marked {record.state}; it can't "
                    f"be activated")
            previous = self.active.get(name)
            t0 = time.monotonic()
            await self.ensure_loaded(name, version)
            self.repo.set_active(name, version)
            self.active[name] = version  # the switch: requests routed from now on get it
            self._configs.pop(name, None)
            self._refresh_traffic(name)
            unloaded = None
            if previous is not None and previous != version and \
                    previous not in self.resident_versions(name):
                old = self.loaded.pop((name, previous), None)
                if old is not None:
                    await old.unload(self.unload_timeout_s)
                    unloaded = previous
            log.info("activated", extra={"model": name, "version": version,
                                         "previous": previous,
                                         "swap_s": round(time.monotonic() - t0, 3)})
            return {"model": name, "version": version, "previous": previous,
                    "unloaded": unloaded}

    def _refresh_traffic(self, name: str) -> None:
        """The traffic policy in force: one set at run time wins over the config's."""
        stored = self.repo.traffic(name)
        if stored is not None:
            policy = TrafficPolicy.from_dict(stored, name)
        else:
            policy = self.model_config(name).traffic
        if policy is None or (not policy.split and policy.shadow is None):
            self.traffic.pop(name, None)
        else:
            self.traffic[name] = policy

    async def set_traffic(self, name: str, policy: TrafficPolicy | None) -> dict:
        """Set (or with None, clear) the run-time traffic policy; its versions are loaded
        and warm before it takes effect."""
        async with self._lock(name):
            if name not in self.active:
                raise NotFound(f"model '{name}' is not served here")
            if policy is not None:
                policy.check(name)
                for v in sorted(policy.versions()):
                    record = self.repo.version(name, v)
                    if record.state != "ready":
                        raise FailedPrecondition(f"model '{name}' version {v} is marked "
                                                 f"{record.state}")
                    await self.ensure_loaded(name, v)
            before = self.resident_versions(name)
            self.repo.set_traffic(name, policy.as_dict() if policy else None)
            self._refresh_traffic(name)
            for v in before - self.resident_versions(name):
                lv = self.loaded.pop((name, v), None)
                if lv is not None:
                    await lv.unload(self.unload_timeout_s)
            current = self.traffic.get(name)
            return {"model": name, "traffic": current.as_dict() if current else None}

    # -- status --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Every active model will answer: loaded and READY, or not loaded but loading on
        its first request (lazy, or evicted for memory; one that cannot fit the budget at
        all stops the start instead, ``BudgetTooSmall``)."""
        for name, version in self.active.items():
            lv = self.loaded.get((name, version))
            if lv is None or lv.state in NOT_SERVING:
                if self.model_config(name).load == "lazy" or \
                        self.evictions.is_out((name, version)):
                    continue
                return False
            if lv.state is not VersionState.READY:
                return False
        return True

    def traffic_policy(self, name: str) -> TrafficPolicy | None:
        """The traffic policy in force for ``name`` (None: the active version answers)."""
        return self.traffic.get(name)
