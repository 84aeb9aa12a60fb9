"""Model lifecycle: load a version (prepare, one session per instance, warm up), check
requests against its specs, unload it after its in-flight requests finish.

A ``LoadedVersion`` knows nothing of sockets; a ``ModelManager`` holds what is loaded and
knows which version of each model is active.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from pathlib import Path

import numpy as np

from appliance.batcher import BatchPolicy, DynamicBatcher, InferRequest, ModelInstance
from appliance.config import Config
from appliance.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutpostError,
    Unavailable,
)
from appliance.model_config import ModelConfig
from appliance.profiles import Profile, resolve
from appliance.protocol import decode_tensor
from appliance.repository import Repository, VersionRecord
from appliance.stats import VersionStats
from engines import BuildOptions, Engine, EngineError, RuntimeOptions, Session

log = logging.getLogger("outpost.models")


class VersionState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    FAILED = "failed"


def build_options(config: ModelConfig, profile: Profile | None = None) -> BuildOptions:
    """The model's batch range, and the device's build fields from its firmware profile."""
    mbs = config.max_batch_size or 0
    preferred = config.dynamic_batching.preferred_batch_sizes
    device = profile.build_fields() if profile is not None else {}
    return BuildOptions(max_batch_size=mbs,
                        opt_batch_size=max(preferred) if preferred else max(1, mbs // 2),
                        **device)


def check_session(session: Session, config: ModelConfig, where: str) -> None:
    """The engine's view of the tensors must agree with the stored config's."""
    for kind, want, have in (("input", config.input_specs(), session.inputs),
                             ("output", config.output_specs(), session.outputs)):
        have_by_name = {s.name: s for s in have}
        for spec in want:
            got = have_by_name.get(spec.name)
            if got is None or got.dtype != spec.dtype or len(got.shape) != len(spec.shape):
                raise FailedPrecondition(
                    f"{where}: {kind} '{spec.name}' is {got} in the engine but "
                    f"{spec} in config.toml; re-add the model")


class LoadedVersion:
    def __init__(self, record: VersionRecord, config: ModelConfig, engine_kind: str):
        self.name = record.model
        self.version = record.version
        self.record = record
        self.config = config
        self.engine_kind = engine_kind
        self.inputs = config.input_specs()
        self.outputs = config.output_specs()
        self.output_names = frozenset(s.name for s in self.outputs)
        self.max_batch_size = config.max_batch_size or 0
        self.stats = VersionStats()
        self.state = VersionState.LOADING
        self.error = ""
        self.batcher: DynamicBatcher | None = None
        self.last_used = time.monotonic()

    def __repr__(self) -> str:
        return f"<LoadedVersion {self.name}:{self.version} {self.state.value}>"

    async def load(self, engine: Engine, cache_dir: Path, runtime: RuntimeOptions,
                   profile: Profile | None = None) -> None:
        where = f"model '{self.name}' version {self.version}"
        try:
            opts = build_options(self.config, profile)
            artifact = await asyncio.to_thread(
                engine.prepare, self.record.model_file, opts, cache_dir)
            instances = []
            for i in range(self.config.instances or 1):
                session = await asyncio.to_thread(engine.load, artifact, opts, runtime)
                check_session(session, self.config, where)
                await asyncio.to_thread(session.warmup)
                instances.append(ModelInstance(session, f"{self.name}:{self.version}#{i}"))
        except (EngineError, OutpostError) as exc:
            self.state = VersionState.FAILED
            self.error = str(exc)
            raise FailedPrecondition(f"{where} failed to load: {exc}") from exc
        db = self.config.dynamic_batching
        policy = BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=db.max_queue_delay_us or 0,
            preferred_batch_sizes=tuple(db.preferred_batch_sizes),
            max_queue_size=db.max_queue_size or 1,
            priority_levels=db.priority_levels,
        )
        self.batcher = DynamicBatcher(policy, instances, self.stats)
        self.state = VersionState.READY

    async def unload(self) -> None:
        """Stop taking requests, let those in flight finish, free the sessions."""
        if self.batcher is None:
            self.state = VersionState.UNLOADED
            return
        self.state = VersionState.UNLOADING
        await self.batcher.stop()
        self.batcher = None
        self.state = VersionState.UNLOADED

    def request(self, inputs: object, priority: object, timeout_ms: object,
                done, tag=None) -> InferRequest:
        """Check a request's fields against this version and build the batcher's request."""
        if not isinstance(inputs, dict):
            raise InvalidArgument("'inputs' must be a map of input name to tensor")
        names = {s.name for s in self.inputs}
        missing = sorted(names - inputs.keys())
        if missing:
            raise InvalidArgument(
                f"inputs lacks {', '.join(repr(m) for m in missing)}; model '{self.name}' "
                f"takes {', '.join(sorted(names))}")
        extra = sorted(str(k) for k in inputs.keys() - names)
        if extra:
            raise InvalidArgument(
                f"input '{extra[0]}' is not an input of model '{self.name}'; it takes "
                f"{', '.join(sorted(names))}")
        feeds: dict[str, np.ndarray] = {}
        signature = []
        rows = None
        for spec in self.inputs:
            where = f"inputs.{spec.name}"
            arr = decode_tensor(inputs[spec.name], where)
            if arr.dtype.name != spec.dtype:
                raise InvalidArgument(
                    f"{where} is {arr.dtype.name} but the model takes {spec.dtype}; "
                    f"outpost does not cast: send {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(
                    w != -1 and w != g for w, g in zip(spec.shape, arr.shape)):
                raise InvalidArgument(
                    f"{where} has shape {list(arr.shape)} but the model takes "
                    f"{list(spec.shape)} (-1: any size)")
            if self.max_batch_size:
                n = arr.shape[0]
                if rows is None:
                    rows = n
                elif n != rows:
                    raise InvalidArgument(
                        f"{where} has {n} rows in dim 0 but other inputs have {rows}; "
                        f"every input of a request carries the same batch")
                signature.append(arr.shape[1:])
            feeds[spec.name] = arr
        if self.max_batch_size:
            if not 1 <= rows <= self.max_batch_size:
                raise InvalidArgument(
                    f"the request's batch (dim 0) is {rows}; model '{self.name}' takes 1 to "
                    f"{self.max_batch_size} rows a request")
        else:
            rows = 1
        db = self.config.dynamic_batching
        if priority is None:
            priority = db.default_priority_level
        elif type(priority) is not int or not 0 <= priority < db.priority_levels:
            raise InvalidArgument(
                f"priority {priority!r} must be an integer in 0..{db.priority_levels - 1} "
                f"for model '{self.name}' (lower runs first)")
        if timeout_ms is None:
            timeout_ms = db.default_timeout_ms or 0
        elif type(timeout_ms) is not int or timeout_ms < 0:
            raise InvalidArgument(f"timeout_ms {timeout_ms!r} must be a non-negative integer")
        deadline = time.monotonic() + timeout_ms / 1e3 if timeout_ms else None
        return InferRequest(feeds, rows, tuple(signature), priority, deadline, done, tag)

    def submit(self, request: InferRequest) -> None:
        if self.state is not VersionState.READY or self.batcher is None:
            raise Unavailable(f"model '{self.name}' version {self.version} is "
                              f"{self.state.value}; retry shortly")
        self.last_used = time.monotonic()
        try:
            self.batcher.enqueue(request)
        except OutpostError as exc:
            self.stats.request_failed(exc.code)
            raise


class ModelManager:
    """What is loaded, which version of each model is active, and loading at start."""

    def __init__(self, repo: Repository, engine: Engine, config: Config):
        self.repo = repo
        self.engine = engine
        self.config = config
        self.runtime = RuntimeOptions(intra_op_threads=config.threads.intra_op,
                                      inter_op_threads=config.threads.inter_op)
        self.loaded: dict[tuple[str, int], LoadedVersion] = {}
        self.active: dict[str, int] = {}
        self.profile = resolve(config.profile).profile

    async def load_version(self, record: VersionRecord) -> LoadedVersion:
        lv = LoadedVersion(record, record.config(), self.engine.kind)
        self.loaded[(lv.name, lv.version)] = lv
        t0 = time.monotonic()
        try:
            await lv.load(self.engine, self.repo.engines_dir, self.runtime, self.profile)
        except OutpostError as exc:
            log.error("load failed", extra={"model": lv.name, "version": lv.version,
                                            "error": str(exc)})
            raise
        log.info("model loaded", extra={"model": lv.name, "version": lv.version,
                                        "engine": self.engine.kind,
                                        "instances": lv.config.instances,
                                        "load_s": round(time.monotonic() - t0, 3)})
        return lv

    async def load_all(self) -> None:
        """Load each model's active version; a model that fails is logged and not ready."""
        for model in self.repo.models():
            if model.active_version is None:
                continue
            self.active[model.name] = model.active_version
            record = next(v for v in model.versions if v.version == model.active_version)
            try:
                await self.load_version(record)
            except OutpostError:
                continue

    def get(self, name: object, version: object = None) -> LoadedVersion:
        if not isinstance(name, str) or not name:
            raise InvalidArgument("'model' must be a non-empty string naming a model")
        if version is not None and (type(version) is not int or version < 1):
            raise InvalidArgument(f"'version' {version!r} must be a positive integer")
        if version is None:
            version = self.active.get(name)
            if version is None:
                raise NotFound(f"model '{name}' is not served here; the 'models' op lists "
                               f"what is")
        lv = self.loaded.get((name, version))
        if lv is None:
            if name not in self.active:
                raise NotFound(f"model '{name}' is not served here; the 'models' op lists "
                               f"what is")
            raise NotFound(f"model '{name}' has no version {version} loaded; loaded: "
                           f"{', '.join(str(v) for (n, v) in self.loaded if n == name)}")
        return lv

    def ready(self) -> bool:
        return all(
            (lv := self.loaded.get((n, v))) is not None and lv.state is VersionState.READY
            for n, v in self.active.items())

    async def unload_all(self) -> None:
        await asyncio.gather(*(lv.unload() for lv in self.loaded.values()))
