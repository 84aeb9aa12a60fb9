"""One model version's lifecycle: load (prepare, one session per instance, warm up), check
requests against its specs, queue them, scale instances with queue depth, unload after
the requests in flight finish.

A ``LoadedVersion`` knows nothing of sockets or of other versions; ``appliance.models``
decides which versions should be loaded and which one is active.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from appliance.config.profiles import Profile
from appliance.errors import (
    FailedPrecondition,
    OutpostError,
    Unavailable,
)
from appliance.models.layout import resolve as resolve_layout
from appliance.models.layout import runtime_for
from appliance.models.model_config import ModelConfig
from appliance.models.repository import VersionRecord
from appliance.models.versions import ServedVersion, VersionState, describe_from_config
from appliance.observe import memory
from appliance.scheduling.batcher import DynamicBatcher
from appliance.scheduling.clock import LoopClock
from appliance.scheduling.holding import HoldingQueue
from appliance.scheduling.instance import ModelInstance
from appliance.scheduling.policy import BatchPolicy
from appliance.scheduling.request import NO_DEADLINE, QueuedRequest
from appliance.scheduling.tuning import Layout, Want
from engines import (
    BuildOptions,
    Engine,
    EngineError,
    RuntimeOptions,
    Session,
    ShapeRange,
)

log = logging.getLogger("outpost.models")


SCALE_CHECK_S = 1.0  # how often idle instances are looked for
# the most a quick model's warm-up on the event loop may hold it (past it: two runs a size)
INLINE_WARMUP_BUDGET_S = 0.005
SCALE_REFUSED_RETRY_S = 5.0  # after the memory budget refused a scale-up, wait this long
# Instances are measured one at a time: the measure is the whole process's RSS
_MEASURING = threading.Lock()
def warm_batch_sizes(max_batch_size: int, preferred: tuple[int, ...],
                     opt_batch_size: int | None = None) -> tuple[int, ...]:
    """Every batch size the batcher is likely to form: one (a lone request), the preferred
    sizes, the maximum (a burst), and TensorRT's optimization profile opt shape."""
    if not max_batch_size:
        return (1,)
    sizes = {1, max_batch_size, *preferred, *([opt_batch_size] if opt_batch_size else [])}
    return tuple(sorted(n for n in sizes if 1 <= n <= max_batch_size))


def build_options(config: ModelConfig, profile: Profile | None = None) -> BuildOptions:
    """The model's batch range and input shapes, and the device's build fields from its
    firmware profile. An input whose dims config.toml fixes gets that shape for every batch
    size (TensorRT needs a range for each dynamic dim the graph leaves open)."""
    mbs = config.max_batch_size or 0
    preferred = config.dynamic_batching.preferred_batch_sizes
    opt = max(preferred) if preferred else max(1, mbs // 2)
    ranges = {}
    for t in config.input:
        dims = tuple(t.dims or ())
        if -1 in dims:
            continue  # left open: the builder says which dim needs fixing
        ranges[t.name] = (ShapeRange((1, *dims), (opt, *dims), (mbs, *dims)) if mbs
                          else ShapeRange(dims, dims, dims))
    device = profile.build_fields() if profile is not None else {}
    return BuildOptions(max_batch_size=mbs, opt_batch_size=opt, shape_ranges=ranges, **device)


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


class LoadedVersion(ServedVersion):
    """An ONNX model version served by an engine through a dynamic batcher."""

    def __init__(self, record: VersionRecord, config: ModelConfig, engine_kind: str):
        describe_from_config(self, record, config, engine_kind)
        self.record = record
        self.state = VersionState.LOADING
        self.batcher: DynamicBatcher | None = None
        self.last_used = time.monotonic()
        # measured as each instance loads (``_measured_instance``); until the first load
        # the manager plans with an earlier measure of this version, or the weights' size
        self.memory_bytes = 0
        self.instance_bytes = 0  # the latest instance's measure
        self._clock = LoopClock(asyncio.get_running_loop())
        self._held = HoldingQueue(  # requests that come while it loads
            f"model '{self.name}' version {self.version}",
            config.dynamic_batching.max_queue_size or 1, self.stats, self._clock)
        self._min_instances = config.instances or 1
        self._max_instances = max(config.max_instances or 0, self._min_instances)
        self._scaling = False
        self._scale_timer: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        self._make_instance = None
        self.layout: Layout | None = None  # settled at load
        # set by the manager: makes room in the memory budget for one more instance of
        # this version (evicting idle versions) or raises why it can't
        self.room_for_instance = None
        self._scale_refused_until = 0.0
        self._batch_of_one_s: float | None = None  # warm-up's steady batch of one

    def __repr__(self) -> str:
        return f"<LoadedVersion {self.name}:{self.version} {self.state.value}>"

    async def load(self, engine: Engine, cache_dir: Path, runtime: RuntimeOptions,
                   profile: Profile | None = None, want: Want | None = None,
                   warmup_budget_s: float = 2.0) -> None:
        """Prepare, settle the layout (``want``: what is fixed; the rest cached or
        measured, models/layout.py), create and warm every instance (to steady state
        within ``warmup_budget_s``; 0: one run at batch one); READY only when all are
        warm."""
        where = f"model '{self.name}' version {self.version}"
        opts = build_options(self.config, profile)
        try:
            artifact = await asyncio.to_thread(
                engine.prepare, self.record.model_file, opts, cache_dir)
            if want is not None:
                self.layout = await asyncio.to_thread(
                    resolve_layout, engine, artifact, opts, runtime, want, cache_dir)
                runtime = runtime_for(runtime, self.layout)
                if self.config.instances is None:
                    self._min_instances = self.layout.instances
                    self._max_instances = max(self.config.max_instances or 0,
                                              self._min_instances)

            db = self.config.dynamic_batching
            preferred = tuple(db.preferred_batch_sizes)
            if not preferred and self.layout is not None and self.layout.preferred_batch:
                preferred = (self.layout.preferred_batch,)
            sizes = warm_batch_sizes(self.max_batch_size, preferred,
                                     opts.opt_batch_size if engine.kind == "tensorrt" else None)

            async def make_instance(i: int) -> ModelInstance:
                t0 = time.monotonic()
                instance, steps = await asyncio.to_thread(
                    self._measured_instance, i, engine, artifact, opts, runtime, sizes,
                    warmup_budget_s)
                self.memory_bytes += instance.memory_bytes
                self.instance_bytes = instance.memory_bytes
                if steps is not None:
                    settled_one = [st.last_ms / 1e3 for st in steps
                                   if st.batch_size == 1 and st.settled]
                    if settled_one:
                        self._batch_of_one_s = settled_one[0]
                    settled = all(s.settled for s in steps)
                    (log.info if settled else log.warning)(
                        "instance warm" if settled else
                        "warm-up did not settle within its budget; serving anyway", extra={
                            "model": self.name, "version": self.version, "instance": i,
                            "warmup_s": round(time.monotonic() - t0, 3),
                            "budget_s": warmup_budget_s, "memory_bytes": instance.memory_bytes,
                            "batches": [s.as_dict() for s in steps]})
                return instance

            instances = [await make_instance(i) for i in range(self._min_instances)]
        except (EngineError, OutpostError) as exc:
            self._fail(f"{where} failed to load: {exc}")
            raise FailedPrecondition(self.error) from exc
        except Exception as exc:  # an engine raising something untyped: a bug; its text
            # and traceback go to the log, the answer stays one line of ours
            log.error("an engine raised an unexpected error while loading",
                      extra={"model": self.name, "version": self.version}, exc_info=True)
            self._fail(f"{where} failed to load: the engine raised an unexpected "
                       f"{exc.__class__.__name__}; the server's log has its details")
            raise FailedPrecondition(self.error) from exc
        self._make_instance = make_instance
        self.preferred_batch_sizes = preferred
        policy = BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=db.max_queue_delay_us or 0,
            preferred_batch_sizes=preferred,
            max_queue_size=db.max_queue_size or 1,
            priority_levels=db.priority_levels,
        )
        self.batcher = DynamicBatcher(policy, instances, self.stats, clock=self._clock)
        if self._batch_of_one_s is not None:
            self.batcher.prime(self._batch_of_one_s)
            if self.batcher.runs_inline(instances[0]):
                # it will run on this loop's thread: warm it here too (each run is under
                # INLINE_MAX_S, so a few of them hold the loop well under a millisecond)
                session = instances[0].session
                session.warm_to_steady(sizes, budget_s=INLINE_WARMUP_BUDGET_S)
        if warmup_budget_s:
            await self._warm_request_path(instances[0].session.zeros(1))
        self.state = VersionState.READY
        self._held.release(self._enqueue)
        if self._max_instances > self._min_instances:
            self._arm_scale_check()

    async def _warm_request_path(self, feeds: dict) -> None:
        """One request of zeros through this version's own path (the checks, the queue,
        the batcher, an instance, the split) before any real one: the first pass through
        that Python code is several times slower than the next (measured: 260 us against
        30). Its figures are then cleared; requests held meanwhile are not released yet."""
        done = asyncio.get_running_loop().create_future()

        def answered(outputs, error) -> None:
            if not done.done():
                done.set_result(error)

        self.batcher.enqueue(self.request_from_arrays(feeds, None, NO_DEADLINE, answered))
        error = await done
        if error is not None:  # the warm-up batches ran; this is only a warning
            log.warning("the request-path warm-up failed", extra={
                "model": self.name, "version": self.version, "error": str(error)})
        self.stats.clear()

    def _measured_instance(self, i: int, engine: Engine, artifact, opts: BuildOptions,
                           runtime: RuntimeOptions, sizes: tuple[int, ...],
                           warmup_budget_s: float) -> tuple[ModelInstance, list | None]:
        """One instance, loaded and warm (in a worker thread), and what it costs: the
        process's resident memory across its load, warm-up at the largest batch and batch
        buffers (the ONNX Runtime arena's growth included: it stays resident), plus the
        device memory the engine reports (TensorRT). One instance is measured at a time."""
        where = f"model '{self.name}' version {self.version}"
        with _MEASURING:
            before = memory.settled_resident_bytes()
            session = engine.load(artifact, opts, runtime)
            try:
                check_session(session, self.config, where)
            except BaseException:
                session.close()
                raise
            instance = ModelInstance(session, f"{self.name}:{self.version}#{i}")
            try:  # on the thread that will run its batches: the engine's per-thread
                # buffers (ONNX Runtime's MLAS) warm there, not on a thread that ends
                steps = None
                if warmup_budget_s:
                    steps = instance.call(lambda: session.warm_to_steady(sizes,
                                                                         warmup_budget_s))
                else:
                    instance.call(session.warmup)
            except BaseException:
                instance.stop()
                raise
            if self.max_batch_size and warmup_budget_s:
                instance.prefill(session.zeros(max(sizes)))
            grown = memory.settled_resident_bytes() - before
        # at least the engine file: its weights are in memory once, however the
        # allocator's pages fell (a tiny model's growth can read as none)
        instance.memory_bytes = (max(grown, _file_bytes(artifact.path))
                                 + session.device_memory_bytes())
        return instance, steps

    def _fail(self, message: str) -> None:
        self.state = VersionState.FAILED
        self.error = message
        self._held.fail(Unavailable(f"{message}; the request could not run"))

    async def unload(self, timeout_s: float | None = None) -> None:
        """Stop taking requests, let those in flight finish, free the sessions."""
        if self._scale_timer is not None:
            self._scale_timer.cancel()
        if self.batcher is None:
            self.state = VersionState.UNLOADED
            return
        self.state = VersionState.UNLOADING
        drained = await self.batcher.stop(timeout_s)
        if not drained:
            log.warning("unload timed out; a stuck instance was abandoned",
                        extra={"model": self.name, "version": self.version})
        self.batcher = None
        self.memory_bytes = 0
        self.state = VersionState.UNLOADED

    def inflight_count(self) -> int:
        queued = self.batcher.inflight_count() if self.batcher else 0
        return queued + len(self._held)

    def submit(self, request: QueuedRequest) -> None:
        self.last_used = time.monotonic()
        if self.state is VersionState.LOADING:
            self._held.hold(request)
            return
        if self.state is not VersionState.READY or self.batcher is None:
            err = Unavailable(f"model '{self.name}' version {self.version} is "
                              f"{self.state.value}{': ' + self.error if self.error else ''}")
            self.stats.request_failed(err.code)
            raise err
        self._enqueue(request)

    def _enqueue(self, request: QueuedRequest) -> None:
        try:
            self.batcher.enqueue(request)
        except OutpostError as exc:
            self.stats.request_failed(exc.code)
            raise
        if (self._max_instances > 1 and not self._scaling
                and self._max_instances > self.batcher.instance_count
                and self.batcher.queued_rows > max(self.max_batch_size, 1)):
            self._scaling = True
            asyncio.get_running_loop().create_task(self._scale_up())

    # -- instance scaling ---------------------------------------------------------------

    async def _scale_up(self) -> None:
        try:
            if time.monotonic() < self._scale_refused_until:
                return
            if self.room_for_instance is not None:
                try:
                    await self.room_for_instance(self)
                except OutpostError as exc:  # the budget said no: serve with what it has
                    self._scale_refused_until = time.monotonic() + SCALE_REFUSED_RETRY_S
                    log.warning("scale-up refused", extra={
                        "model": self.name, "version": self.version,
                        "instances": self.batcher.instance_count, "reason": str(exc)})
                    return
            n = self.batcher.instance_count
            inst = await self._make_instance(n)
            if self.batcher is None or self.state is not VersionState.READY:
                await asyncio.to_thread(inst.stop)
                self.memory_bytes -= inst.memory_bytes
                return
            self.batcher.add_instance(inst)
            log.info("instance added", extra={"model": self.name, "version": self.version,
                                              "instances": self.batcher.instance_count})
        except Exception as exc:
            log.warning("scale-up failed", extra={"model": self.name, "error": str(exc)})
        finally:
            self._scaling = False

    def _arm_scale_check(self) -> None:
        loop = asyncio.get_running_loop()
        self._scale_timer = loop.call_later(SCALE_CHECK_S, self._scale_check)

    def _scale_check(self) -> None:
        """Drop one instance when the queue has stayed empty for a while."""
        b = self.batcher
        if b is None or self.state is not VersionState.READY:
            return
        now = time.monotonic()
        if b.inflight_count():
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        elif (now - self._idle_since >= self.config.scale_down_idle_s
              and b.instance_count > self._min_instances):
            inst = b.remove_idle_instance()
            if inst is not None:
                self.memory_bytes -= inst.memory_bytes
                asyncio.get_running_loop().run_in_executor(None, inst.stop)
                log.info("instance removed", extra={"model": self.name,
                                                    "version": self.version,
                                                    "instances": b.instance_count})
            self._idle_since = now
        self._arm_scale_check()

    @property
    def instance_count(self) -> int:
        return self.batcher.instance_count if self.batcher else 0


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def weights_bytes(record: VersionRecord) -> int:
    """The model's files (its weights), what a version's first load plans with before
    anything of it was measured."""
    return sum(p.stat().st_size for p in record.path.rglob("*")
               if p.is_file() and p.name not in ("config.toml", "samples.npz"))
