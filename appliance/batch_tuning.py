"""Which batch size a model should prefer on this device, measured rather than guessed.

Opt-in per model (``dynamic_batching.auto_preferred_batch = true``). At load, one warm
instance runs batches of 1, 2, 4, ... up to ``max_batch_size`` and the batcher then
prefers the smallest size within ``TOLERANCE`` of the best rows/s: larger batches only add
latency there. Whether batching pays depends on the device and engine, not the model
alone: on a GPU, or for a model whose per-call overhead dominates (a small MLP), rows/s
grows with the batch; a convolutional model on one CPU core runs no faster per image in
large batches and loses its cache to them (on the 2-core benchmark machine the demo CNN
served 91% of the raw engine's best preferring batch 1 and 76% forming batches of 32).

The figures are cached beside the engine artifact, keyed by the artifact and the thread
counts, so a restart reuses them (delete ``<data_dir>/engines/*.batch.json`` to measure
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
from engines.cache import atomic_write_bytes

log = logging.getLogger("outpost.batching")

TOLERANCE = 0.10  # a size within 10% of the best rows/s counts as good as the best
BUDGET_S = 3.0  # measuring stops starting new sizes after this long
MIN_RUNS = 3
MIN_SIZE_S = 0.05  # each size runs at least this long (and MIN_RUNS times)


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
    """Rows/s of ``session`` at each size (its best run), smallest first, while the
    budget lasts: a size whose runs would not fit in it is not started, so a slow model
    is measured at batch 1 alone. A size the engine fails on ends the measuring: larger
    ones would fail too (device memory, the engine's own batch limit)."""
    rates: dict[int, float] = {}
    started = clock()
    last_s = last_size = 0
    for size in sizes:
        if rates and clock() - started + 2 * last_s * size / last_size > budget_s:
            break
        feeds = {s.name: np.zeros((size, *s.shape[1:]), dtype=s.dtype)
                 for s in session.inputs}
        try:
            session.run(feeds)  # a new shape: the engine may set itself up for it
            best, runs, t_size = float("inf"), 0, clock()
            while True:
                t0 = clock()
                session.run(feeds)
                best = min(best, clock() - t0)
                runs += 1
                if runs >= MIN_RUNS and clock() - t_size >= MIN_SIZE_S:
                    break
                if clock() - started > budget_s:
                    break
        except Exception as exc:  # the engine's own errors: stop, keep what was measured
            log.warning("batch size measuring stopped", extra={"size": size,
                                                               "error": str(exc)})
            break
        best = max(best, 1e-9)
        rates[size] = size / best
        last_s, last_size = best, size
    return rates


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
