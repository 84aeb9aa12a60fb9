"""The scheduler's clock: the one seam through which it reads the time and sets timers, so
that its timing (queue delay, deadlines) can be tested on a clock the test moves.

Times are ``time.monotonic()`` seconds, as in request deadlines. ``LoopClock`` is the real
one; tests use a fake (tests/support/fake_clock.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A timer once set: it can be called off (a no-op once it has fired)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """The time now, in ``time.monotonic()`` seconds."""
        ...

    def call_at(self, when: float, callback: Callable[..., object], *args) -> Timer:
        """Call ``callback(*args)`` on the event loop at ``when`` (``now()`` seconds;
        one already past: as soon as the loop can)."""
        ...


class LoopClock:
    """``time.monotonic()`` and the event loop's timers.

    ``now`` and ``call_at`` are attributes, not methods, so that a caller that binds them
    once pays no call of ours per request: ``now`` is ``time.monotonic`` itself, and so is
    ``call_at`` the loop's own where the loop keeps ``time.monotonic()`` time (asyncio's
    loops). Another loop's time base (uvloop's ``time()`` counts milliseconds, from the
    start of the loop's iteration) is converted at each call, as an offset from now."""

    __slots__ = ("now", "call_at", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now: Callable[[], float] = time.monotonic
        if type(loop).time is asyncio.BaseEventLoop.time:  # time.monotonic()
            self.call_at: Callable[..., Timer] = loop.call_at
        else:
            self.call_at = self._call_at_converted

    def _call_at_converted(self, when: float, callback: Callable[..., object],
                           *args) -> Timer:
        loop = self._loop
        return loop.call_at(loop.time() + (when - time.monotonic()), callback, *args)
