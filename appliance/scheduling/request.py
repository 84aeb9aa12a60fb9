"""A request as the scheduler holds it: its arrays, batch signature, priority, deadline
and the callback that answers it, with its state (QUEUED, RUNNING, DONE)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np

from appliance.errors import OutpostError
from appliance.scheduling.clock import Timer

QUEUED, RUNNING, DONE = 0, 1, 2
NO_DEADLINE = math.inf  # a request's deadline when it asked for none


# done(outputs, error): exactly one of them is None. Called on the event loop thread.
DoneCallback = Callable[[dict | None, OutpostError | None], None]


class Owner(Protocol):
    """What holds a request now (its batcher, or the holding queue while its version
    loads) and can forget it again."""

    def cancel(self, request: QueuedRequest) -> None: ...


class QueuedRequest:
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
        self.timer: Timer | None = None  # its deadline's, set by what holds it
        self.tag = tag  # whatever the caller wants back (e.g. the connection)
        self.owner: Owner | None = None  # what holds it (see Owner)


def cancel_request(request: QueuedRequest) -> None:
    """The caller went away: drop the request if it still waits; no reply."""
    if request.owner is not None:
        request.owner.cancel(request)
    elif request.state != DONE:
        request.state = DONE
    # Nor is its callback kept: a transport's reply may hold the request (a cycle, with
    # its arrays, that only the cyclic collector would free once the caller is gone).
    request.done = _no_reply


def _no_reply(outputs, error) -> None:
    """A cancelled request's callback: its caller is gone."""
