"""Busy polling: after a request is answered, the event loop keeps polling its sockets
for a short window instead of sleeping in the kernel.

A sequential client sends its next request a few tens of microseconds after the answer
arrives. A loop asleep in ``epoll_wait`` then pays a wake-up (on a 2-vCPU KVM guest
about 13 us of the round trip, measured with the identity model at concurrency 1); a loop
still polling takes the request at once. The price is CPU: at most the window per
answered read, spent only while requests keep coming (Linux's ``net.core.busy_poll`` makes
the same trade for network sockets). ``server.busy_poll_us`` sets the window, 0 turns it
off; the firmware profiles of mains-powered x86 hosts turn it on, the Jetson ones don't.

Polling holds the GIL between zero-timeout waits, and a worker thread asking for the GIL
can lose the race for it to the loop each time until the switch interval (5 ms) passes.
So polling stops at once while any batch is out on a worker thread (``BatchWindow``
counts them): only quick models answered on the loop itself keep it polling.
"""

from __future__ import annotations

import asyncio
import time

from appliance.scheduling.window import BatchWindow


class BusyPoller:
    """One per event loop; loop thread only."""

    __slots__ = ("window_s", "_loop", "_batches", "_until", "_active")

    def __init__(self, loop: asyncio.AbstractEventLoop, window_us: int, batches: BatchWindow):
        self.window_s = window_us / 1e6
        self._loop = loop
        self._batches = batches
        self._until = 0.0
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def extend(self) -> None:
        """Poll for another window from now (called once a read is fully answered)."""
        self._until = time.monotonic() + self.window_s
        if not self._active:
            self._active = True
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        # A callback that reschedules itself: the loop's next wait has a zero timeout.
        if self._batches.on_workers or time.monotonic() >= self._until:
            self._active = False
            return
        self._loop.call_soon(self._poll)
