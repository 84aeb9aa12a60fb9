"""Which batch size a model should prefer on this device, measured rather than guessed.

Opt-in per model (``dynamic_batching.auto_preferred_batch = true``). At load, one warm
instance runs batches of 1, 2, 4, ... up to ``max_batch_size`` (in rounds through all the
sizes, each size's best run counting) and the batcher then prefers the smallest size
within ``TOLERANCE`` of the best rows/s: larger batches only add latency there.

Whether batching pays depends on the device and engine, not the model alone: on a GPU, or
for a model whose per-call overhead dominates (a small MLP), rows/s grows with the batch;
a convolutional model on one CPU core runs no faster per image in large batches and loses
its cache to them (on the 2-core benchmark machine the demo CNN served 91% of the raw
engine's best preferring batch 1 and 76% forming batches of 32).

The figures are cached beside the engine artifact, keyed by the artifact and the thread
counts, so a restart reuses them (delete ``<data_dir>/engines/*.batch-*.json`` to measure
again).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from engines import RuntimeOptions
from engines.base import Session
from engines.files import atomic_write_bytes

log = logging.getLogger("outpost.batching")

TOLERANCE = 0.10  # a size within 10% of the best rows/s counts as good as the best
BUDGET_S = 3.0  # measuring stops starting new sizes after this long
ROUNDS = 3  # passes over the sizes, interleaved against the machine's drift
MIN_RUNS = 2  # runs of a size in each round, at the least
MIN_SIZE_S = 0.06  # each size runs at least this long, over all the rounds


def candidate_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... and ``max_batch_size`` itself."""
    sizes, s = [], 1
    while s < max_batch_size:
        sizes.append(s)
        s *= 2
    sizes.append(max_batch_size)
    return sizes


def choose(rates: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The smallest batch size whose rows/s is within ``tolerance`` of the best."""
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= (1 - tolerance) * best)


def tunable(session: Session) -> bool:
    """Only inputs whose every dim but the batch is fixed give a batch to measure with."""
    return all(len(s.shape) >= 1 and all(d >= 0 for d in s.shape[1:]) for s in session.inputs)


def measure(session: Session, sizes: list[int], budget_s: float = BUDGET_S,
            clock=time.perf_counter) -> dict[int, float]:
    """Rows/s of ``session`` at each size: its best run over ``ROUNDS`` rounds that go
    through all the sizes in turn, so a machine that slows down for a while slows every
    size alike. The first round stops before a size whose runs would not fit in the
    budget (a slow model is measured at batch 1 alone), and before a size the engine
    fails on: larger ones would fail too (device memory, the engine's own limit)."""
    best: dict[int, float] = {}
    feeds: dict[int, dict] = {}
    started = clock()
    for rnd in range(ROUNDS):
        for size in sizes:
            if rnd == 0:
                if best:
                    last = max(best)
                    if clock() - started + 2 * ROUNDS * best[last] * size / last > budget_s:
                        break
                feeds[size] = {s.name: np.zeros((size, *s.shape[1:]), dtype=s.dtype)
                               for s in session.inputs}
            elif size not in best:
                continue
            try:
                if rnd == 0:
                    session.run(feeds[size])  # a new shape: the engine may set itself up
                runs, t_size = 0, clock()
                while True:
                    t0 = clock()
                    session.run(feeds[size])
                    best[size] = min(best.get(size, float("inf")), max(clock() - t0, 1e-9))
                    runs += 1
                    if runs >= MIN_RUNS and clock() - t_size >= MIN_SIZE_S / ROUNDS:
                        break
                    if clock() - started > budget_s:
                        break
            except Exception as exc:  # the engine's own errors: this size and larger out
                log.warning("batch size measuring stopped", extra={"size": size,
                                                                   "error": str(exc)})
                sizes = [k for k in sizes if k < size]
                best = {k: t for k, t in best.items() if k < size}
                break
        if clock() - started > budget_s:
            break
    return {size: size / t for size, t in best.items()}


def tuning_path(cache_dir: Path, cache_key: str, runtime: RuntimeOptions) -> Path:
    return cache_dir / (f"{cache_key}.batch-{runtime.intra_op_threads}x"
                        f"{runtime.inter_op_threads}.json")


def preferred_batch_size(session: Session, max_batch_size: int, path: Path) -> int | None:
    """The batch size to prefer: from ``path`` when it was measured for this
    ``max_batch_size``, else measured now and written there. None: nothing to measure."""
    try:
        cached = json.loads(path.read_text())
        if cached["max_batch_size"] == max_batch_size and \
                1 <= cached["preferred"] <= max_batch_size:
            return int(cached["preferred"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing, unreadable or for another batch limit: measure again
    if not tunable(session):
        return None
    rates = measure(session, candidate_sizes(max_batch_size))
    if not rates:
        return None
    chosen = choose(rates)
    record = {"max_batch_size": max_batch_size, "preferred": chosen,
              "rows_per_s": {str(k): round(v, 1) for k, v in rates.items()},
              "tolerance": TOLERANCE, "measured_at": time.time()}
    try:
        atomic_write_bytes(path, json.dumps(record, indent=1).encode())
    except OSError as exc:  # a full disk: use the figure now, measure again next time
        log.warning("batch size figures not saved", extra={"path": str(path),
                                                          "error": str(exc)})
    log.info("preferred batch size measured", extra={
        "preferred": chosen, "rows_per_s": record["rows_per_s"]})
    return chosen
