"""Dynamic batching: queues and time, not engines.

``decide`` is the pure batching decision (send now, or wait how long), a function of the
queue and the oldest request's age, as in Triton's dynamic batcher. ``DynamicBatcher``
owns the queues on the event loop and hands formed batches to ``ModelInstance`` workers,
one thread and one engine session each. Everything here except ``ModelInstance._work``
runs on the event loop thread, so the queue state needs no locks.

A busy instance may hold one more batch, formed ahead once a full one is queued, so that
it starts on it the moment it finishes: under load the event loop is busy reading
requests, and an engine waiting for the loop to hand it the next batch sat idle for
about half a millisecond after every batch (measured on the demo CNN at batch 1).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.errors import (
    DeadlineExceeded,
    Internal,
    OutpostError,
    ResourceExhausted,
    Unavailable,
)
from appliance.stats import VersionStats
from engines.base import Session
from engines.errors import EngineError

QUEUED, RUNNING, DONE = 0, 1, 2
INLINE_MAX_S = 100e-6  # a batch this quick runs on the event loop, not a worker thread
INLINE_MIN_SAMPLES = 16
PIPELINE_DEPTH = 2  # batches one instance holds: the one it runs and the next, formed ahead

# done(outputs, error): exactly one of them is None. Called on the event loop thread.
DoneCallback = Callable[[dict | None, OutpostError | None], None]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # 0: the model has no batch dim; one request per run
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    priority_levels: int = 1


def ready_rows(queued_rows: int, policy: BatchPolicy) -> int:
    """The batch that goes without waiting, as in Triton: the largest preferred size that
    can be formed; without one, a full batch; 0 when neither can be formed yet."""
    if policy.preferred_batch_sizes:
        preferred = [p for p in policy.preferred_batch_sizes if p <= queued_rows]
        if preferred:
            return max(preferred)
    limit = max(policy.max_batch_size, 1)
    return limit if queued_rows >= limit else 0


def decide(queued_rows: int, oldest_age_us: float, policy: BatchPolicy) -> tuple[int, float]:
    """How many rows to send now, or (0, microseconds to wait) before asking again.

    A preferred size goes as soon as one can be formed (the largest), else a full batch;
    the rest goes, up to a full batch, when the oldest request has waited
    ``max_queue_delay_us``.
    """
    if queued_rows <= 0:
        return 0, 0.0
    rows = ready_rows(queued_rows, policy)
    if rows:
        return rows, 0.0
    wait_us = policy.max_queue_delay_us - oldest_age_us
    if wait_us <= 0:
        return min(queued_rows, max(policy.max_batch_size, 1)), 0.0
    return 0, wait_us


class BatchWindow:
    """While a window is open, enqueued requests wait for it to close and then go out as
    batches: the server opens one around each read, so the frames one read brings form
    one batch instead of a run each (quick models otherwise run at once, one at a time).
    It also counts the batches out on worker threads, for the busy poller (which must not
    hold the GIL while a worker needs it). One per event loop (``window_for``); loop thread
    only."""

    __slots__ = ("depth", "pending", "on_workers")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list[DynamicBatcher] = []
        self.on_workers = 0  # batches handed to worker threads, not yet finished

    def open(self) -> None:
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        while not self.depth and self.pending:
            pending, self.pending = self.pending, []
            for i, batcher in enumerate(pending):
                try:
                    batcher._window_closed()
                except BaseException:  # a bug: the batchers after it still get their turn
                    self.pending[:0] = pending[i + 1:]
                    raise


_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def window_for(loop: asyncio.AbstractEventLoop) -> BatchWindow:
    window = _WINDOWS.get(loop)
    if window is None:
        window = _WINDOWS[loop] = BatchWindow()
    return window


class InferRequest:
    __slots__ = ("inputs", "rows", "signature", "priority", "deadline", "done", "enqueued",
                 "started", "state", "timer", "tag", "owner")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, signature: tuple,
                 priority: int, deadline: float | None, done: DoneCallback, tag=None):
        self.inputs = inputs
        self.rows = rows
        self.signature = signature  # the non-batch dims: requests batch when these agree
        self.priority = priority
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.done = done
        self.enqueued = 0.0
        self.started = 0.0
        self.state = QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.tag = tag  # whatever the caller wants back (e.g. the connection)
        self.owner: DynamicBatcher | None = None  # the batcher that queued it


class ModelInstance:
    """One session on one worker thread, and its batch input buffers. Nothing else."""

    def __init__(self, session: Session, name: str):
        self.session = session
        # Batch input buffers, reused: one set for each batch the instance may hold, taken
        # in turn (its batches run in the order they were handed over).
        self._staging: list[dict[str, np.ndarray]] = [{} for _ in range(PIPELINE_DEPTH)]
        self._turn = 0
        self._jobs: collections.deque = collections.deque()
        self._wake = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def gather(self, requests: list[InferRequest]) -> dict[str, np.ndarray]:
        """A batch's inputs in this instance's next staging buffers (``gather_inputs``).
        The turn moves on only once the batch is formed: a batch handed over two turns
        ago has finished by then, so its buffers are free."""
        feeds = gather_inputs(requests, self._staging[self._turn])
        self._turn = (self._turn + 1) % PIPELINE_DEPTH
        return feeds

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)
        self._wake.release()

    def stop(self) -> None:
        self.submit(None)
        self._thread.join(timeout=30)
        self.session.close()

    def abandon(self) -> None:
        """Let a worker that may be stuck in the engine exit when it can; don't wait."""
        self.submit(None)

    def _work(self) -> None:
        while True:
            self._wake.acquire()
            job = self._jobs.popleft()
            if job is None:
                return
            job()
            job = None  # idle, it would still hold the last batch's requests and inputs


def _gather(arrays: list[np.ndarray], staging: dict, name: str) -> np.ndarray:
    """Concatenate into this instance's reused buffer for ``name``: a fresh allocation of a
    large batch each time would cost page faults on every run."""
    total = sum(len(a) for a in arrays)
    first = arrays[0]
    buf = staging.get(name)
    if buf is None or buf.shape[1:] != first.shape[1:] or buf.dtype != first.dtype \
            or len(buf) < total:
        buf = np.empty((total, *first.shape[1:]), first.dtype)
        staging[name] = buf
    out = buf[:total]
    np.concatenate(arrays, out=out)
    return out


def gather_inputs(requests: list[InferRequest], staging: dict) -> dict[str, np.ndarray]:
    """A batch's inputs: concatenated along dim 0 into ``staging``'s reused buffers, or a
    lone request's own arrays."""
    if len(requests) == 1:
        return requests[0].inputs
    names = requests[0].inputs.keys()
    return {n: _gather([r.inputs[n] for r in requests], staging, n) for n in names}


def run_and_split(session: Session, feeds: dict[str, np.ndarray],
                  requests: list[InferRequest]) -> list[dict[str, np.ndarray]]:
    """Run one batch and split its outputs back per request exactly."""
    outputs = session.run(feeds)
    if len(requests) == 1:
        return [outputs]
    total = sum(r.rows for r in requests)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise EngineError(
                f"output '{name}' came back with shape {list(arr.shape)} for a batch of "
                f"{total}; a batched model's outputs must keep dim 0"
            )
    split = []
    start = 0
    for r in requests:
        end = start + r.rows
        split.append({n: a[start:end] for n, a in outputs.items()})
        start = end
    return split


class DynamicBatcher:
    """The scheduler for one model version: Enqueue, InflightInferenceCount, Stop."""

    def __init__(self, policy: BatchPolicy, instances: list[ModelInstance],
                 stats: VersionStats, loop: asyncio.AbstractEventLoop | None = None):
        self.policy = policy
        self.stats = stats
        self._loop = loop or asyncio.get_running_loop()
        self._window = window_for(self._loop)
        self._waiting_window = False
        self._queues = [collections.deque() for _ in range(policy.priority_levels)]
        self._queued = 0  # live requests waiting (expired ones may still sit in the deques)
        self._queued_rows = 0
        self._dead = 0  # expired or cancelled requests still in the deques
        self._running = 0  # requests handed to an instance, not yet answered
        self._load = {inst: 0 for inst in instances}  # instance -> batches handed to it
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._drained: asyncio.Event | None = None
        self._timed = 0  # batches timed so far
        self._last_compute_s = 0.0  # engine time of the batch being answered
        self._compute_ewma_s = 1.0  # moving average of a batch's engine time (until the
        # first run: slow, so nothing runs on the loop unmeasured)

    # -- the scheduler's contract -----------------------------------------------------

    def enqueue(self, request: InferRequest) -> None:
        """Queue a request or raise at once (RESOURCE_EXHAUSTED, UNAVAILABLE)."""
        if self._stopping:
            raise Unavailable("this model version is unloading; retry and the router "
                              "will pick the version now active")
        if self._queued >= self.policy.max_queue_size:
            raise ResourceExhausted(
                f"the queue is full ({self.policy.max_queue_size} requests waiting); "
                f"retry later or raise dynamic_batching.max_queue_size"
            )
        request.enqueued = time.monotonic()
        request.owner = self
        self._queues[request.priority].append(request)
        self._queued += 1
        self._queued_rows += request.rows
        if request.deadline is not None:
            request.timer = self._loop.call_at(
                self._loop.time() + max(0.0, request.deadline - request.enqueued),
                self._expire, request)
        if self._window.depth:
            if not self._waiting_window:
                self._waiting_window = True
                self._window.pending.append(self)
        else:
            self._schedule()  # returns at once when no instance can take a batch

    def _window_closed(self) -> None:
        self._waiting_window = False
        if self._queued:
            self._schedule()

    def inflight_count(self) -> int:
        return self._queued + self._running

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def instance_count(self) -> int:
        return len(self._load)

    def add_instance(self, instance: ModelInstance) -> None:
        self._load[instance] = 0
        if self._queued:
            self._schedule()

    def remove_idle_instance(self) -> ModelInstance | None:
        """Take one idle instance out of service (the caller stops it); None if all busy."""
        if len(self._load) <= 1:
            return None
        for inst in reversed(self._load):
            if not self._load[inst]:
                del self._load[inst]
                return inst
        return None

    async def stop(self, timeout_s: float | None = None) -> bool:
        """Refuse new requests, finish every queued and running one, stop the instances.

        Returns False when ``timeout_s`` passed first: what is still queued then fails with
        UNAVAILABLE, and a worker stuck in the engine is left to finish on its own.
        """
        self._stopping = True
        drained = True
        if self.inflight_count():
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), timeout_s)
            except TimeoutError:
                drained = False
                self._fail_queued(Unavailable("the version was unloaded before this request "
                                              "could run; retry"))
        instances, self._load = list(self._load), {}
        for inst in instances:
            if drained:
                await asyncio.to_thread(inst.stop)
            else:
                inst.abandon()
        return drained

    def _fail_queued(self, err: OutpostError) -> None:
        for q in self._queues:
            while q:
                r = q.popleft()
                if r.state == QUEUED:
                    self._answer(r, None, err)
        self._queued = self._queued_rows = self._dead = 0

    def _answer(self, r: InferRequest, outputs, err: OutpostError | None) -> None:
        """The one place a request is answered: DONE, its timer off, counted, called back."""
        r.state = DONE
        if r.timer is not None:
            r.timer.cancel()
        if err is not None:
            self.stats.request_failed(err.code)
        else:
            self.stats.request_done(time.monotonic() - r.enqueued, r.started - r.enqueued,
                                    self._last_compute_s)
        r.done(outputs, err)

    # -- state changes (event loop) ------------------------------------------------------

    def cancel(self, request: InferRequest) -> None:
        """Forget a request whose caller went away; no callback."""
        if request.state == QUEUED:
            self._retire(request)
        request.state = DONE

    def _retire(self, request: InferRequest) -> None:
        self._queued -= 1
        self._queued_rows -= request.rows
        self._dead += 1
        if request.timer is not None:
            request.timer.cancel()
        if self._dead > max(64, self._queued):
            self._compact()
        self._check_drained()

    def _compact(self) -> None:
        for i, q in enumerate(self._queues):
            self._queues[i] = collections.deque(r for r in q if r.state == QUEUED)
        self._dead = 0

    def _expire(self, request: InferRequest) -> None:
        if request.state == DONE:
            return
        waited_ms = (time.monotonic() - request.enqueued) * 1e3
        where = "in the queue" if request.state == QUEUED else "while running"
        if request.state == QUEUED:
            self._retire(request)
        request.timer = None  # it has fired
        self._answer(request, None, DeadlineExceeded(
            f"the request's timeout passed {where} after {waited_ms:.1f} ms; raise "
            f"timeout_ms or lower the load"))

    def _oldest(self) -> InferRequest | None:
        for q in self._queues:
            while q and q[0].state != QUEUED:
                q.popleft()
                self._dead -= 1
            if q:
                return q[0]
        return None

    def _pick(self) -> ModelInstance | None:
        """Where the next batch goes: an idle instance, else one with room for a batch
        formed ahead; None when every instance is full."""
        ahead = None
        for inst, n in self._load.items():
            if not n:
                return inst
            if ahead is None and n < PIPELINE_DEPTH:
                ahead = inst
        return ahead

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queued == 1 and not self._dead and not self.policy.max_queue_delay_us:
            # One request, nothing expired in the deques with it (the usual case at low
            # load): it goes alone, at once, to an idle instance, as decide and _take
            # would conclude at three times the cost.
            instance = self._pick()
            if instance is not None and not self._load[instance]:
                for q in self._queues:  # the one queued: nothing dead to skip
                    if q:
                        batch = [q.popleft()]
                        break
                self._dispatch(instance, self._start_running(batch, batch[0].rows))
                return
        while self._queued:
            instance = self._pick()
            if instance is None:
                return
            head = self._oldest()
            if head is None:
                return
            if self._load[instance]:
                # Ahead of a busy instance only a batch that would go without waiting (a
                # preferred size or a full batch): a partial one would stop growing.
                rows = ready_rows(self._queued_rows, self.policy)
                if not rows:
                    return
            else:
                age_us = (time.monotonic() - head.enqueued) * 1e6
                rows, wait_us = decide(self._queued_rows, age_us, self.policy)
                if rows == 0:
                    self._timer = self._loop.call_later(wait_us / 1e6, self._schedule)
                    return
            batch = self._take(head, rows if self.policy.max_batch_size else 1)
            self._dispatch(instance, batch)

    def _take(self, head: InferRequest, rows: int) -> list[InferRequest]:
        """Up to ``rows`` rows of requests shaped like ``head``, by priority then age."""
        batch, total = [], 0
        for q in self._queues:
            while q and total < rows:
                r = q[0]
                if r.state != QUEUED:
                    q.popleft()
                    self._dead -= 1
                    continue
                if r.signature != head.signature or total + r.rows > rows:
                    break
                q.popleft()
                batch.append(r)
                total += r.rows
            if total >= rows:
                break
        if not batch:  # head alone is bigger than `rows` asked for: send it by itself
            self._queues[head.priority].remove(head)
            batch, total = [head], head.rows
        return self._start_running(batch, total)

    def _start_running(self, batch: list[InferRequest], rows: int) -> list[InferRequest]:
        """Count ``batch`` (taken out of the deques, ``rows`` rows) as running."""
        now = time.monotonic()
        for r in batch:
            r.state = RUNNING
            r.started = now
        self._queued -= len(batch)
        self._queued_rows -= rows
        self._running += len(batch)
        return batch

    def _dispatch(self, instance: ModelInstance, batch: list[InferRequest]) -> None:
        loop = self._loop
        busy = self._load[instance]
        self._load[instance] = busy + 1
        session = instance.session
        try:
            # The copy is made here on the loop, which holds the GIL anyway: made by the
            # worker, it waited about 300 us an image to get the GIL back from the loop
            # (demo CNN at batch 2, c=64).
            feeds = instance.gather(batch)
        except Exception as exc:  # never reached the engine: no engine time to count
            self._complete(instance, batch, exc, None)
            return
        if not busy and self._inline_ok(instance):
            # Tiny models: two thread hand-offs would cost more than the run itself.
            t0 = time.perf_counter()
            try:
                result: list | BaseException = run_and_split(session, feeds, batch)
            except BaseException as exc:
                result = exc
            self._complete(instance, batch, result, time.perf_counter() - t0)
            return

        def job() -> None:
            t0 = time.monotonic()
            try:
                result: list | BaseException = run_and_split(session, feeds, batch)
            except BaseException as exc:  # reported per request on the loop
                result = exc
            loop.call_soon_threadsafe(self._finished, instance, batch, result,
                                      time.monotonic() - t0)

        self._window.on_workers += 1
        instance.submit(job)

    def _inline_ok(self, instance: ModelInstance) -> bool:
        """Run on the loop itself: only sessions that allow it, only once enough batches
        have shown the model to be far cheaper than a thread hand-off."""
        return (instance.session.inline_ok and self._timed >= INLINE_MIN_SAMPLES
                and self._compute_ewma_s < INLINE_MAX_S)

    def _finished(self, instance: ModelInstance, batch: list[InferRequest],
                  result, compute_s: float) -> None:
        self._window.on_workers -= 1
        self._complete(instance, batch, result, compute_s)
        if self._queued:
            self._schedule()

    def _complete(self, instance: ModelInstance, batch: list[InferRequest],
                  result, compute_s: float | None) -> None:
        if compute_s is not None:  # None: the batch failed before the engine ran it
            self._timed += 1
            # The first run starts the average: from a 1 s prior, a 10 us model took
            # some 90 batches to look quick, not the INLINE_MIN_SAMPLES meant.
            self._compute_ewma_s = compute_s if self._timed == 1 else (
                self._compute_ewma_s + (compute_s - self._compute_ewma_s) * 0.1)
        self._running -= len(batch)
        if instance in self._load:
            self._load[instance] -= 1
        self._last_compute_s = compute_s or 0.0
        if isinstance(result, BaseException):
            err = (result if isinstance(result, OutpostError)
                   else Internal(f"the engine failed on this batch: {result}"))
            for r in batch:
                if r.state == RUNNING:
                    self._answer(r, None, err)
        else:
            self.stats.batch_done(batch[0].rows if len(batch) == 1
                                  else sum(r.rows for r in batch))
            for r, outputs in zip(batch, result):
                if r.state == RUNNING:
                    self._answer(r, outputs, None)
        if self._drained is not None:
            self._check_drained()

    def _check_drained(self) -> None:
        if self._drained is not None and not self.inflight_count():
            self._drained.set()
