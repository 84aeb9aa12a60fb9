"""Dynamic batching: queues and time, not engines.

``decide`` is the pure batching decision (send now, or wait how long), a function of the
queue and the oldest request's age, as in Triton's dynamic batcher. ``DynamicBatcher``
owns the queues on the event loop and hands formed batches to ``ModelInstance`` workers,
one thread and one engine session each. Everything here except ``ModelInstance._work``
runs on the event loop thread, so the queue state needs no locks. The time it reads and the
timers it sets (queue delay, deadlines, the drain timeout) go through a ``Clock``; only an
engine run is timed with the real clock, as the engine's time it is.

A busy instance may hold one more batch, formed ahead once a full one is queued, so that
it starts on it the moment it finishes: under load the event loop is busy reading
requests, and an engine waiting for the loop to hand it the next batch sat idle for
about half a millisecond after every batch (measured on the demo CNN at batch 1).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

from appliance.errors import (
    DeadlineExceeded,
    Internal,
    OutpostError,
    ResourceExhausted,
    Unavailable,
)
from appliance.observe.stats import VersionStats
from appliance.scheduling.clock import Clock, LoopClock, Timer
from appliance.scheduling.instance import PIPELINE_DEPTH, ModelInstance, run_and_split
from appliance.scheduling.policy import BatchPolicy, decide, ready_rows
from appliance.scheduling.request import DONE, QUEUED, RUNNING, QueuedRequest
from appliance.scheduling.window import window_for

log = logging.getLogger("outpost.batcher")

# What a client hears when the engine raises: the engine's own words (ONNX Runtime's,
# CUDA's) go to the log, at most once a minute per version, not into an answer.
ENGINE_FAILED = "the engine failed on this batch; the server's log says why"
FAILURE_LOG_INTERVAL_S = 60.0

INLINE_MAX_S = 100e-6  # a batch this quick runs on the event loop, not a worker thread


INLINE_MIN_SAMPLES = 16


class DynamicBatcher:
    """The scheduler for one model version: Enqueue, InflightInferenceCount, Stop."""

    def __init__(self, policy: BatchPolicy, instances: list[ModelInstance],
                 stats: VersionStats, loop: asyncio.AbstractEventLoop | None = None,
                 clock: Clock | None = None):
        self.policy = policy
        self.stats = stats
        self._loop = loop or asyncio.get_running_loop()
        self._clock = clock or LoopClock(self._loop)
        # Bound once: read for every request (LoopClock's are time.monotonic and, on
        # asyncio's loops, loop.call_at themselves).
        self._now = self._clock.now
        self._call_at = self._clock.call_at
        self._window = window_for(self._loop)
        self._waiting_window = False
        self._queues = [collections.deque() for _ in range(policy.priority_levels)]
        self._failures, self._failure_logged_at = 0, -math.inf
        self._queued = 0  # live requests waiting (expired ones may still sit in the deques)
        self._queued_rows = 0
        self._dead = 0  # expired or cancelled requests still in the deques
        self._running = 0  # requests handed to an instance, not yet answered
        self._load = {inst: 0 for inst in instances}  # instance -> batches handed to it
        self._timer: Timer | None = None
        self._stopping = False
        self._drained: asyncio.Event | None = None
        self._timed = 0  # batches timed so far
        self._last_compute_s = 0.0  # engine time of the batch being answered
        self._compute_ewma_s = 1.0  # moving average of a batch's engine time (until the
        # first run: slow, so nothing runs on the loop unmeasured)

    def prime(self, compute_s: float) -> None:
        """Start the engine-time average from a measure taken before serving (warm-up's
        steady batch of one), as if INLINE_MIN_SAMPLES batches had shown it: a quick
        model then runs on the loop from its first request instead of its seventeenth."""
        if self._timed == 0:
            self._compute_ewma_s = compute_s
            self._timed = INLINE_MIN_SAMPLES

    # -- the scheduler's contract -----------------------------------------------------

    def enqueue(self, request: QueuedRequest) -> None:
        """Queue a request or raise at once (RESOURCE_EXHAUSTED, UNAVAILABLE)."""
        if self._stopping:
            raise Unavailable("this model version is unloading; retry and the router "
                              "will pick the version now active")
        if self._queued >= self.policy.max_queue_size:
            raise ResourceExhausted(
                f"the queue is full ({self.policy.max_queue_size} requests waiting); "
                f"retry later or raise dynamic_batching.max_queue_size"
            )
        request.enqueued = self._now()
        request.owner = self
        self._queues[request.priority].append(request)
        self._queued += 1
        self._queued_rows += request.rows
        if request.deadline is not None:
            request.timer = self._call_at(request.deadline, self._expire, request)
        if self._window.depth:
            if not self._waiting_window:
                self._waiting_window = True
                self._window.pending.append(self)
        else:
            self._schedule()  # returns at once when no instance can take a batch

    def window_closed(self) -> None:
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
            self._drained = event = asyncio.Event()
            timer = (None if timeout_s is None
                     else self._call_at(self._now() + timeout_s, event.set))
            try:
                await event.wait()
            finally:
                if timer is not None:
                    timer.cancel()
            if self.inflight_count():  # the timeout passed first
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

    def _answer(self, r: QueuedRequest, outputs, err: OutpostError | None) -> None:
        """The one place a request is answered: DONE, its timer off, counted, called back."""
        r.state = DONE
        if r.timer is not None:
            r.timer.cancel()
        if err is not None:
            self.stats.request_failed(err.code)
        else:
            self.stats.request_done(self._now() - r.enqueued, r.started - r.enqueued,
                                    self._last_compute_s)
        r.done(outputs, err)

    # -- state changes (event loop) ------------------------------------------------------

    def cancel(self, request: QueuedRequest) -> None:
        """Forget a request whose caller went away; no callback."""
        if request.state == QUEUED:
            self._retire(request)
        request.state = DONE

    def _retire(self, request: QueuedRequest) -> None:
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

    def _expire(self, request: QueuedRequest) -> None:
        if request.state == DONE:
            return
        waited_ms = (self._now() - request.enqueued) * 1e3
        where = "in the queue" if request.state == QUEUED else "while running"
        if request.state == QUEUED:
            self._retire(request)
        request.timer = None  # it has fired
        self._answer(request, None, DeadlineExceeded(
            f"the request's timeout passed {where} after {waited_ms:.1f} ms; raise "
            f"timeout_ms or lower the load"))

    def _oldest(self) -> QueuedRequest | None:
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
                now = self._now()
                rows, wait_us = decide(self._queued_rows, (now - head.enqueued) * 1e6,
                                       self.policy)
                if rows == 0:
                    self._timer = self._call_at(now + wait_us / 1e6, self._schedule)
                    return
            batch = self._take(head, rows if self.policy.max_batch_size else 1)
            self._dispatch(instance, batch)

    def _take(self, head: QueuedRequest, rows: int) -> list[QueuedRequest]:
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

    def _start_running(self, batch: list[QueuedRequest], rows: int) -> list[QueuedRequest]:
        """Count ``batch`` (taken out of the deques, ``rows`` rows) as running."""
        now = self._now()
        for r in batch:
            r.state = RUNNING
            r.started = now
        self._queued -= len(batch)
        self._queued_rows -= rows
        self._running += len(batch)
        return batch

    def _dispatch(self, instance: ModelInstance, batch: list[QueuedRequest]) -> None:
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
            self._complete(instance, batch, exc.with_traceback(None), None)
            return
        if not busy and self._inline_ok(instance):
            # Tiny models: two thread hand-offs would cost more than the run itself.
            t0 = time.perf_counter()
            try:
                result: list | BaseException = run_and_split(session, feeds, batch)
            except BaseException as exc:
                # Without its traceback: kept, it would hold this frame (and the batch's
                # inputs) in a cycle until the cyclic collector ran.
                result = exc.with_traceback(None)
            self._complete(instance, batch, result, time.perf_counter() - t0)
            return

        # The worker's only hold on the batch, emptied by the loop when it takes the
        # answer: the worker may still be returning from job() (or not yet have dropped
        # it) when the requests are answered, and must not keep them alive past that.
        handed: list = [batch]

        def job() -> None:
            t0 = time.monotonic()
            try:
                result: list | BaseException = run_and_split(session, feeds, handed[0])
            except BaseException as exc:  # reported per request on the loop
                result = exc.with_traceback(None)  # no cycle through this frame
            handed.append(result)
            loop.call_soon_threadsafe(self._finished_handed, instance, handed,
                                      time.monotonic() - t0)

        self._window.on_workers += 1
        instance.submit(job)

    def runs_inline(self, instance: ModelInstance) -> bool:
        """Whether a batch for ``instance`` would run on the event loop now."""
        return self._inline_ok(instance)

    def _inline_ok(self, instance: ModelInstance) -> bool:
        """Run on the loop itself: only sessions that allow it, only once enough batches
        have shown the model to be far cheaper than a thread hand-off."""
        return (instance.session.inline_ok and self._timed >= INLINE_MIN_SAMPLES
                and self._compute_ewma_s < INLINE_MAX_S)

    def _finished_handed(self, instance: ModelInstance, handed: list,
                         compute_s: float) -> None:
        batch, result = handed
        handed.clear()
        self._finished(instance, batch, result, compute_s)

    def _finished(self, instance: ModelInstance, batch: list[QueuedRequest],
                  result, compute_s: float) -> None:
        self._window.on_workers -= 1
        self._complete(instance, batch, result, compute_s)
        if self._queued:
            self._schedule()

    def _engine_failed(self, instance: ModelInstance, exc: BaseException) -> Internal:
        self._failures += 1
        now = time.monotonic()
        if now >= self._failure_logged_at + FAILURE_LOG_INTERVAL_S:
            log.error("the engine failed on a batch", extra={
                "instance": instance.name, "failures": self._failures,
                "error": f"{exc.__class__.__name__}: {exc}"})
            self._failure_logged_at, self._failures = now, 0
        return Internal(ENGINE_FAILED)

    def _complete(self, instance: ModelInstance, batch: list[QueuedRequest],
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
                   else self._engine_failed(instance, result))
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
