"""How a model runs on this device: intra-op threads x instances, ONNX Runtime's spinning,
and the batch size to prefer, measured at its first load rather than guessed.

Candidates: every ``threads x instances`` that fits the usable cores (1, 2, 4, ... threads;
as many instances as the rest allows), each thread count with spinning off and on, and
batch sizes 1, 2, 4, ... up to ``max_batch_size``. What the model's config, the appliance
config or ``--threads`` fix is not measured, only taken.

A model quicker than a thread hand-off (``INLINE_MAX_S``) runs on the event loop itself,
where more threads or instances only add wake-ups: it takes the fewest cores, and only its
batch size is measured.

The rule: the c=1 latency of a layout is that of one batch-1 request on one of its
sessions, each run after a pause as long as a sequential client's round trip
(``REQUEST_GAP_S``), so that what the threads cost to wake shows, as it does in a server;
the layout served is the one with the best throughput (rows/s, its instances running at
once, at its preferred batch) whose c=1 latency stays within ``LATENCY_BOUND`` of the best
c=1 latency measured. Between layouts within ``TIE_TOLERANCE`` of that throughput, the one
using the fewest cores wins. Of those, the ones within ``SPIN_TOLERANCE`` of the best
rows/s and of the quickest c=1 latency among them are as good, and of those a spinning one
is taken: spinning is ONNX Runtime's own default, and in a server its threads, awake
between a sequential client's requests, saved the demo CNN 0.3-0.6 ms a request, more than
this in-process measure shows on a noisy host; so not spinning is taken only where it
measures better, on either count (a profile for power-budgeted boards fixes it off:
spinning spends a core for some 50 ms after each batch). The preferred batch is the
smallest size within ``BATCH_TOLERANCE`` of the best rows/s: larger batches only add
latency there.

Whether batching or threads pay depends on the device and the engine: on a GPU, or for a
model whose per-call overhead dominates (a small MLP), rows/s grows with the batch; a
convolutional model on one CPU core runs no faster per image in large batches. On the
2-core benchmark machine, two intra-op threads cut the demo CNN's batch-1 latency by about
a third, which one thread per instance cannot.

Measuring takes a few seconds (``BUDGET_S``); the result is cached beside the engine
artifact, keyed by the artifact (its hash covers the engine version), the usable cores
and what was fixed, so a restart reuses it. Delete ``<data_dir>/engines/*.layout-*.json``
to measure again.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from appliance.scheduling.batcher import INLINE_MAX_S
from engines.base import Session
from engines.files import atomic_write_bytes

log = logging.getLogger("outpost.tuning")

LATENCY_BOUND = 0.15  # a layout may be this much slower at c=1 than the quickest one
TIE_TOLERANCE = 0.10  # more cores must serve this much more to be worth taking
SPIN_TOLERANCE = 0.03  # not spinning must be this much quicker at c=1, or serve this much more
BATCH_TOLERANCE = 0.10  # a batch size within 10% of the best rows/s is as good
BUDGET_S = 4.0  # measuring stops starting new candidates after this long
ROUNDS = 3  # passes over the candidates, interleaved against the machine's drift
MIN_RUNS = 2  # runs of a batch size in each round, at the least
MIN_SIZE_S = 0.06  # each batch size runs at least this long, over all the rounds
LATENCY_S = 0.05  # batch-1 runs timed for the c=1 latency, per round
REQUEST_GAP_S = 0.5e-3  # the pause before each of them: a sequential client's round trip
CONCURRENT_S = 0.25  # how long several instances run at once, per round
# The times above suit a model of a few ms a run; a quicker one is measured in
# proportionally less time (down to this share of them): its figures settle sooner.
SLOW_RUN_S = 3e-3
MIN_SCALE = 0.1
CACHE_VERSION = 5  # of the cache file's format and what it measured; another one is measured again


@dataclass(frozen=True)
class Want:
    """What is fixed (None: measure it), and the room to measure in."""

    cores: int  # usable cores (appliance.config.cpus)
    max_batch_size: int  # 0 or 1: nothing to batch
    threads: int | None = None  # intra-op threads per instance
    instances: int | None = None
    spinning: bool | None = None  # ONNX Runtime intra-op spinning
    preferred_batch: int | None = None  # fixed by config; 0: no preference, don't measure
    thread_counts: bool = True  # False: the engine has no intra-op threads (TensorRT)

    def key(self) -> str:
        fixed = "-".join(str(v) if v is not None else "a" for v in (
            self.threads, self.instances, self.spinning, self.preferred_batch))
        return f"{self.cores}c-b{self.max_batch_size}-{fixed}"


@dataclass(frozen=True)
class Layout:
    threads: int
    instances: int
    spinning: bool
    preferred_batch: int | None  # None: no preference (the batcher forms full batches)
    source: str  # measured | cached | fixed
    reason: str  # one line: why this layout

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        batch = f"prefers batch {self.preferred_batch}" if self.preferred_batch else \
            "no preferred batch"
        return (f"{self.threads} thread{'s' if self.threads > 1 else ''} x "
                f"{self.instances} instance{'s' if self.instances > 1 else ''}"
                f"{', spinning' if self.spinning else ''}, {batch} ({self.source}: "
                f"{self.reason})")


# make_session(threads, spinning) -> a new session; the caller closes nothing: sessions
# made here are closed here.
MakeSession = Callable[[int, bool], Session]
# progress(done, total, what): called as candidates are measured
Progress = Callable[[int, int, str], None]


def candidate_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... and ``max_batch_size`` itself."""
    sizes, s = [], 1
    while s < max_batch_size:
        sizes.append(s)
        s *= 2
    sizes.append(max(max_batch_size, 1))
    return sizes


def choose_batch(rates: dict[int, float], tolerance: float = BATCH_TOLERANCE) -> int:
    """The smallest batch size whose rows/s is within ``tolerance`` of the best."""
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)


def tunable(session: Session) -> bool:
    """Only inputs whose every dim but the batch is fixed give a batch to measure with."""
    return all(len(s.shape) >= 1 and all(d >= 0 for d in s.shape[1:]) for s in session.inputs)


def _powers(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    if limit not in out:
        out.append(limit)
    return out


def candidates(want: Want) -> list[tuple[int, int, bool]]:
    """(threads, instances, spinning) to measure, within the usable cores."""
    threads = [want.threads] if want.threads is not None else (
        _powers(want.cores) if want.thread_counts else [1])
    out = []
    for t in threads:
        if want.instances is not None:
            counts = [want.instances]
        elif want.thread_counts:
            counts = _powers(max(1, want.cores // t))
        else:  # a GPU: a second context overlaps one batch's copies with another's run
            counts = [1, 2]
        spins = [want.spinning] if want.spinning is not None else (
            [False, True] if t > 1 and want.thread_counts else [False])
        for spin in spins:
            out.extend((t, i, spin) for i in counts)
    return out


def choose(results: list[dict], bound: float = LATENCY_BOUND) -> dict:
    """The rule (module docstring) over measured candidates: each a dict with threads,
    instances, spinning, latency_s and rows_per_s."""
    best_latency = min(r["latency_s"] for r in results)
    fast = [r for r in results if r["latency_s"] <= (1 + bound) * best_latency]
    top = max(r["rows_per_s"] for r in fast)
    tied = [r for r in fast if r["rows_per_s"] >= (1 - TIE_TOLERANCE) * top]
    cores = min(r["threads"] * r["instances"] for r in tied)
    fewest = [r for r in tied if r["threads"] * r["instances"] == cores]
    most = max(r["rows_per_s"] for r in fewest)
    near = [r for r in fewest if r["rows_per_s"] >= (1 - SPIN_TOLERANCE) * most]
    quickest = min(r["latency_s"] for r in near)
    good = [r for r in near if r["latency_s"] <= (1 + SPIN_TOLERANCE) * quickest]
    spinning = [r for r in good if r["spinning"]]
    return max(spinning or good, key=lambda r: r["rows_per_s"])


class _Clock:
    def __init__(self, clock, budget_s: float):
        self.clock = clock
        self.started = clock()
        self.budget_s = budget_s

    def spent(self) -> float:
        return self.clock() - self.started

    def over(self) -> bool:
        return self.spent() > self.budget_s


def _feeds(session: Session, size: int) -> dict[str, np.ndarray]:
    """Random inputs, not zeros: some kernels take shortcuts on zeros."""
    rng = np.random.default_rng(size)
    out = {}
    for s in session.inputs:  # an open dim other than the batch gets 1, as in a warm-up
        shape = (size, *(d if d >= 0 else 1 for d in s.shape[1:])) if s.shape else ()
        dtype = np.dtype(s.dtype)
        if dtype.kind == "f":
            out[s.name] = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            out[s.name] = rng.random(shape) < 0.5
        else:
            out[s.name] = rng.integers(0, 2, shape).astype(dtype)
    return out


def _best_run(session: Session, feeds, clock, min_s: float, budget: _Clock,
              pause: Callable[[float], None] | None = None) -> float:
    """The quickest of at least MIN_RUNS runs lasting ``min_s`` together; with ``pause``,
    each run comes after ``pause(REQUEST_GAP_S)``."""
    best, runs, t_start = float("inf"), 0, clock()
    while True:
        if pause is not None:
            pause(REQUEST_GAP_S)
        t0 = clock()
        session.run(feeds)
        best = min(best, max(clock() - t0, 1e-9))
        runs += 1
        if (runs >= MIN_RUNS and clock() - t_start >= min_s) or budget.over():
            return best


def measure_batches(session: Session, sizes: list[int], budget: _Clock,
                    clock=time.perf_counter, min_size_s: float = MIN_SIZE_S
                    ) -> dict[int, float]:
    """Rows/s of one session at each size: its best run over ROUNDS rounds going through
    all the sizes in turn. The first round stops before a size whose runs would not fit
    in the budget, and before a size the engine fails on (larger ones would fail too)."""
    best: dict[int, float] = {}
    feeds: dict[int, dict] = {}
    for rnd in range(ROUNDS):
        for size in sizes:
            if rnd == 0:
                if best:
                    last = max(best)
                    left = budget.budget_s - budget.spent()
                    if 2 * ROUNDS * best[last] * size / last > left:
                        break
                feeds[size] = _feeds(session, size)
            elif size not in best:
                continue
            try:
                if rnd == 0:
                    session.run(feeds[size])  # a new shape: the engine may set itself up
                t = _best_run(session, feeds[size], clock, min_size_s / ROUNDS, budget)
                best[size] = min(best.get(size, float("inf")), t)
            except Exception as exc:  # the engine's own errors: this size and larger out
                log.warning("batch size measuring stopped", extra={"size": size,
                                                                   "error": str(exc)})
                sizes = [k for k in sizes if k < size]
                best = {k: t for k, t in best.items() if k < size}
                break
        if budget.over():
            break
    return {size: size / t for size, t in best.items()}


def _concurrent_rows_per_s(sessions: list[Session], size: int, seconds: float) -> float:
    """Rows/s of several sessions run at once, each on a thread of its own."""
    feeds = _feeds(sessions[0], size)
    counts = [0] * len(sessions)
    start = threading.Barrier(len(sessions) + 1)
    stop = threading.Event()

    def work(i: int, session: Session) -> None:
        start.wait()
        while not stop.is_set():
            session.run(feeds)
            counts[i] += size

    threads = [threading.Thread(target=work, args=(i, s), daemon=True)
               for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    done = sum(counts)
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    return done / elapsed


def measure_layouts(make_session: MakeSession, want: Want, *, budget_s: float = BUDGET_S,
                    progress: Progress | None = None, clock=time.perf_counter,
                    pause: Callable[[float], None] = time.sleep
                    ) -> tuple[Layout, list[dict]]:
    """Measure the candidates and choose by the rule; returns the layout and the table of
    what was measured (for the cache file and the logs). ``clock`` times the runs of one
    session, ``pause`` waits between the c=1 runs; several instances at once are timed on
    the wall clock."""
    cands = candidates(want)
    if len(cands) == 1 and want.preferred_batch is not None:
        t, i, spin = cands[0]
        return Layout(t, i, spin, want.preferred_batch or None, "fixed",
                      "fixed by the config"), []
    budget = _Clock(clock, budget_s)
    per_thread = sorted({(t, spin) for t, _, spin in cands})
    sessions: dict[tuple[int, bool], list[Session]] = {}
    results: list[dict] = []
    quick = ""
    total = len(per_thread) + sum(1 for _, i, _ in cands if i > 1)
    step = 0
    try:
        # 1. One session per (threads, spinning): c=1 latency, rows/s at each batch size.
        latency: dict[tuple[int, bool], list[float]] = {k: [] for k in per_thread}
        rates: dict[tuple[int, bool], dict[int, float]] = {}
        for key in per_thread:
            sessions[key] = [make_session(*key)]
        first = sessions[per_thread[0]][0]
        batch = want.max_batch_size > 1 and want.preferred_batch is None and tunable(first)
        sizes = candidate_sizes(want.max_batch_size) if batch else [1]
        one = _feeds(first, 1)
        for s in (x[0] for x in sessions.values()):
            s.run(one)  # warm: the first run of a session sets it up
        t0 = clock()
        first.run(one)
        t_one = clock() - t0
        if t_one < INLINE_MAX_S and len(cands) > 1:
            # Quicker than a thread hand-off: the batcher runs it on the event loop itself,
            # where more threads or instances only add wake-ups. The fewest cores it is.
            cands = [min(cands, key=lambda c: (c[0] * c[1], c[2]))]
            per_thread = [(cands[0][0], cands[0][2])]
            total = 1
            quick = (f"{_duration(t_one)} a run, quicker than a thread hand-off: it runs on "
                     f"the event loop, so the fewest cores")
        scale = min(1.0, max(MIN_SCALE, t_one / SLOW_RUN_S))
        budget.budget_s *= scale
        for _ in range(ROUNDS):  # latencies interleaved against drift
            for key in per_thread:
                latency[key].append(_best_run(sessions[key][0], one, clock,
                                              LATENCY_S * scale, budget, pause))
        share = max(0.2 * scale, (budget.budget_s - budget.spent()) / max(1, total))
        for key in per_thread:
            step += 1
            if progress is not None:
                progress(step, total, f"{key[0]} thread(s){', spinning' if key[1] else ''}")
            own = _Clock(clock, share)
            rates[key] = measure_batches(sessions[key][0], sizes, own, clock,
                                         MIN_SIZE_S * scale)
        # 2. Several instances at once, at the batch their one session preferred.
        for t, i, spin in cands:
            key = (t, spin)
            preferred = want.preferred_batch or (choose_batch(rates[key]) if batch else 1)
            if i == 1:
                rows = rates[key].get(preferred, max(rates[key].values()))
            else:
                step += 1
                if progress is not None:
                    progress(step, total, f"{i} instances of {t} thread(s)")
                while len(sessions[key]) < i:
                    sessions[key].append(make_session(t, spin))
                rows = statistics.median(
                    _concurrent_rows_per_s(sessions[key][:i], preferred,
                                           CONCURRENT_S * scale) for _ in range(2))
            results.append({"threads": t, "instances": i, "spinning": spin,
                            "latency_s": min(latency[key]), "rows_per_s": rows,
                            "preferred_batch": preferred if batch or want.preferred_batch
                            else None})
    finally:
        for group in sessions.values():
            for s in group:
                s.close()
    chosen = choose(results)
    best_latency = min(r["latency_s"] for r in results)
    reason = quick or (
        f"best of {len(results)} layouts on {want.cores} core(s): "
        f"{chosen['rows_per_s']:.0f} rows/s, c=1 latency {_duration(chosen['latency_s'])} "
        f"(quickest {_duration(best_latency)}; bound +{LATENCY_BOUND:.0%})")
    layout = Layout(chosen["threads"], chosen["instances"], chosen["spinning"],
                    chosen["preferred_batch"], "measured", reason)
    return layout, results


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def layout_path(cache_dir: Path, cache_key: str, want: Want) -> Path:
    return cache_dir / f"{cache_key}.layout-{want.key()}.json"


def read_cached(path: Path) -> Layout | None:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_VERSION:
            return None
        chosen = data["layout"]
        return Layout(int(chosen["threads"]), int(chosen["instances"]),
                      bool(chosen["spinning"]), chosen["preferred_batch"], "cached",
                      str(chosen["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, unreadable, another format: measure again


def resolve_layout(make_session: MakeSession, want: Want, path: Path, *,
                   progress: Progress | None = None, clock=time.perf_counter) -> Layout:
    """The layout for this model here: cached at ``path``, else measured and written
    there (atomically: a process killed while measuring leaves no file behind)."""
    cached = read_cached(path)
    if cached is not None:
        return cached
    log.info("measuring the layout", extra={"cores": want.cores, "cache": path.name})
    layout, table = measure_layouts(make_session, want, progress=progress, clock=clock)
    if layout.source == "measured":
        record = {"format": CACHE_VERSION, "layout": layout.as_dict(),
                  "want": asdict(want), "measured": table, "measured_at": time.time(),
                  "rule": {"latency_bound": LATENCY_BOUND, "tie_tolerance": TIE_TOLERANCE,
                           "spin_tolerance": SPIN_TOLERANCE,
                           "batch_tolerance": BATCH_TOLERANCE}}
        try:
            atomic_write_bytes(path, json.dumps(record, indent=1).encode())
        except OSError as exc:  # a full disk: use the figure now, measure again next time
            log.warning("layout figures not saved", extra={"path": str(path),
                                                          "error": str(exc)})
        log.info("layout measured", extra={"layout": layout.describe()})
    return layout
