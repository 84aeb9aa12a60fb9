"""The batching decision, pure: send now, or wait how long (as Triton's dynamic batcher),
a function of the queue and the oldest request's age."""

from __future__ import annotations

from dataclasses import dataclass


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
