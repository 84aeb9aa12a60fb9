"""Requests held while their version loads: a bounded queue, each request until its
deadline, handed over in arrival order when the load ends (or answered with its error).

One for plain versions and ensembles alike; the holding queue is the held requests' owner,
so a caller that goes away (``cancel_request``) drops its request here too.
"""

from __future__ import annotations

from collections.abc import Callable

from appliance.errors import DeadlineExceeded, OutpostError, ResourceExhausted
from appliance.observe.stats import VersionStats
from appliance.scheduling.clock import Clock
from appliance.scheduling.request import DONE, QUEUED, QueuedRequest


class HoldingQueue:
    """At most ``limit`` requests wait; past it a request is refused (RESOURCE_EXHAUSTED),
    and each held request fails at its deadline (DEADLINE_EXCEEDED). Refusals, expiries
    and failures count on ``stats``, the version's. Event loop thread only."""

    __slots__ = ("what", "limit", "stats", "_clock", "_held")

    def __init__(self, what: str, limit: int, stats: VersionStats, clock: Clock) -> None:
        self.what = what  # how errors name the version: "model 'a' version 1"
        self.limit = limit
        self.stats = stats
        self._clock = clock
        self._held: dict[QueuedRequest, None] = {}  # the live ones, in arrival order

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request: QueuedRequest) -> None:
        """Hold ``request`` until the load ends, or raise RESOURCE_EXHAUSTED at once."""
        if len(self._held) >= self.limit:
            err = ResourceExhausted(f"{self.what} is loading and {self.limit} requests "
                                    f"already wait for it; retry shortly")
            self.stats.request_failed(err.code)
            raise err
        request.enqueued = self._clock.now()
        request.owner = self
        self._held[request] = None
        if request.deadline is not None:
            request.timer = self._clock.call_at(request.deadline, self._expire, request)

    def cancel(self, request: QueuedRequest) -> None:
        """Forget a request whose caller went away; no callback."""
        if request in self._held:
            del self._held[request]
            _stop_timer(request)
        request.state = DONE

    def release(self, fn: Callable[[QueuedRequest], None]) -> None:
        """The load is done: hand each live request to ``fn`` (the version's own submit),
        oldest first. A refusal ``fn`` raises (OutpostError, counted by ``fn`` as a
        submit's would be) answers that request; the others go on."""
        held, self._held = self._held, {}
        for r in held:
            _stop_timer(r)
            r.owner = None  # fn's to own now
            if r.state != QUEUED:  # cancelled by an answer to one handed over before it
                continue
            try:
                fn(r)
            except OutpostError as exc:
                r.state = DONE
                r.done(None, exc)

    def fail(self, error: OutpostError) -> None:
        """The load failed: answer every live request with ``error``."""
        held, self._held = self._held, {}
        for r in held:
            _stop_timer(r)
            if r.state == QUEUED:
                r.state = DONE
                self.stats.request_failed(error.code)
                r.done(None, error)

    def _expire(self, request: QueuedRequest) -> None:
        if request not in self._held:  # released, failed or cancelled meanwhile
            return
        del self._held[request]
        request.timer = None  # it has fired
        request.state = DONE
        err = DeadlineExceeded(f"the request's timeout passed while {self.what} was loading; "
                               f"raise timeout_ms or load it ahead (load = 'eager')")
        self.stats.request_failed(err.code)
        request.done(None, err)


def _stop_timer(request: QueuedRequest) -> None:
    if request.timer is not None:
        request.timer.cancel()
        request.timer = None
