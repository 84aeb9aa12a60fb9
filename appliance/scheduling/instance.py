"""One model instance: one engine session on one worker thread, its reused batch
buffers, and splitting a batch's outputs back per request."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np

from appliance.scheduling.request import QueuedRequest
from engines.base import Session
from engines.errors import EngineError

PIPELINE_DEPTH = 2  # batches one instance holds: the one it runs and the next, formed ahead


class ModelInstance:
    """One session on one worker thread, and its batch input buffers. Nothing else."""

    def __init__(self, session: Session, name: str):
        self.session = session
        self.name = name
        self.memory_bytes = 0  # what loading and warming it cost, measured (models/loaded.py)
        # Batch input buffers, reused: one set for each batch the instance may hold, taken
        # in turn (its batches run in the order they were handed over).
        self._staging: list[dict[str, np.ndarray]] = [{} for _ in range(PIPELINE_DEPTH)]
        self._turn = 0
        # The hand-off to the worker: one C call each way (a deque and a
        # threading.Semaphore, a Condition written in Python, did the same in more steps;
        # benchmarks/bench_handoff.py measures the trip: 40-130 us either way, on noise).
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def gather(self, requests: list[QueuedRequest]) -> dict[str, np.ndarray]:
        """A batch's inputs in this instance's next staging buffers (``gather_inputs``).
        The turn moves on only once the batch is formed: a batch handed over two turns
        ago has finished by then, so its buffers are free."""
        feeds = gather_inputs(requests, self._staging[self._turn])
        self._turn = (self._turn + 1) % PIPELINE_DEPTH
        return feeds

    def prefill(self, feeds: dict[str, np.ndarray]) -> None:
        """Allocate and touch each turn's batch buffers at the largest batch (``feeds``:
        zeros of that shape), so the first full batch does not page them in. Before the
        instance takes work."""
        for staging in self._staging:
            for name, arr in feeds.items():
                buf = np.empty_like(arr)
                buf.fill(0)  # np.zeros may map untouched zero pages
                staging[name] = buf

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on this instance's worker thread and wait for its result (from
        another thread, before the instance takes batches: its warm-up)."""
        done = threading.Event()
        box: list = []

        def job() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # re-raised in the caller's thread
                box.append((False, exc))
            finally:
                done.set()

        self.submit(job)
        done.wait()
        ok, value = box.pop()
        if not ok:
            raise value
        return value

    def submit(self, job: Callable[[], None] | None) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self.submit(None)
        self._thread.join(timeout=30)
        self.session.close()

    def abandon(self) -> None:
        """Let a worker that may be stuck in the engine exit when it can; don't wait."""
        self.submit(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
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


def gather_inputs(requests: list[QueuedRequest], staging: dict) -> dict[str, np.ndarray]:
    """A batch's inputs: concatenated along dim 0 into ``staging``'s reused buffers, or a
    lone request's own arrays."""
    if len(requests) == 1:
        return requests[0].inputs
    names = requests[0].inputs.keys()
    return {n: _gather([r.inputs[n] for r in requests], staging, n) for n in names}


def run_and_split(session: Session, feeds: dict[str, np.ndarray],
                  requests: list[QueuedRequest]) -> list[dict[str, np.ndarray]]:
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
