"""A clock that moves only when the test moves it (appliance/scheduling/clock.py's seam)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

MAX_FIRINGS = 100_000  # in one advance: more means timers re-arm themselves at one time


class FakeTimer:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time stands still until ``advance(seconds)``, which fires the timers that fall due,
    in order of their times (timers set for one time: in the order they were set), each
    with ``now()`` at its own time, then leaves ``now()`` at the end. Callbacks run inside
    ``advance``; what they hand to the event loop runs once the test lets the loop run
    (``await asyncio.sleep(0)``).

    Starting at 0 keeps microsecond steps exact enough that a timer set ``d`` seconds
    ahead is due after ``advance(d)``, however the step is split."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, FakeTimer]] = []  # a heap
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[..., object], *args) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args) -> FakeTimer:
        return self.call_at(self._now + delay, callback, *args)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        end = self._now + seconds
        fired = 0
        while self._timers and self._timers[0][0] <= end:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            fired += 1
            if fired > MAX_FIRINGS:
                raise RuntimeError(f"timers keep re-arming at t={when}: time can't move on")
            self._now = max(self._now, when)
            timer.cancelled = True  # fired: a later cancel is a no-op
            timer.callback(*timer.args)
        self._now = end

    def pending(self) -> int:
        """Timers set and neither fired nor cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def next_due(self) -> float | None:
        """When the next live timer is due; None if there is none."""
        live = [w for w, _, t in self._timers if not t.cancelled]
        return min(live) if live else None
