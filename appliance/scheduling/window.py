"""The batch window of an event loop: frames that one read brings go out together."""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol


class WindowWaiter(Protocol):
    """A batcher holding requests until the window closes."""

    def window_closed(self) -> None: ...


class BatchWindow:
    """While a window is open, enqueued requests wait for it to close and then go out as
    batches: the server opens one around each read, so the frames one read brings form
    one batch instead of a run each (quick models otherwise run at once, one at a time).
    It also counts the batches out on worker threads, for the busy poller (which must not
    hold the GIL while a worker needs it). One per event loop (``window_for``); loop thread
    only."""

    __slots__ = ("depth", "pending", "on_workers")

    def __init__(self) -> None:
        self.depth = 0
        self.pending: list[WindowWaiter] = []
        self.on_workers = 0  # batches handed to worker threads, not yet finished

    def open(self) -> None:
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        while not self.depth and self.pending:
            pending, self.pending = self.pending, []
            for i, batcher in enumerate(pending):
                try:
                    batcher.window_closed()
                except BaseException:  # a bug: the batchers after it still get their turn
                    self.pending[:0] = pending[i + 1:]
                    raise


_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def window_for(loop: asyncio.AbstractEventLoop) -> BatchWindow:
    window = _WINDOWS.get(loop)
    if window is None:
        window = _WINDOWS[loop] = BatchWindow()
    return window
