"""When and how fast the agent downloads: a token bucket for ``max_download_bytes_per_s``
and the local-time ``download_windows``. Pure: the clock and the sleep are passed in.

Windows are ``"HH:MM-HH:MM"`` (comma-separated) in the device's local time, start
included, end excluded; ``24:00`` may end one. A window whose end is earlier than its
start spans midnight (``"22:00-04:00"`` is 22:00 to 04:00 the next morning); one that
starts where it ends is refused (empty, or the whole day? ``"00:00-24:00"`` says the
whole day).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

_WINDOW = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")


class TokenBucket:
    """At most ``rate`` bytes a second on average, bursts up to ``burst`` bytes.

    It starts empty, so a short download is paced from its first byte; ``take`` sleeps
    until the bytes just received are paid for (they are already here: the sleep holds
    back the next read, which is what throttles a TCP sender)."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.clock, self.sleep = clock, sleep
        self.tokens = 0.0
        self.at = clock()

    def take(self, n: int) -> float:
        """Account for ``n`` bytes; returns the seconds slept."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / self.rate
        self.sleep(wait)
        return wait


@dataclass(frozen=True)
class Window:
    start_min: int  # minutes after local midnight
    end_min: int  # may be below start_min: the window spans midnight

    def contains(self, minute: int) -> bool:
        if self.start_min < self.end_min:
            return self.start_min <= minute < self.end_min
        return minute >= self.start_min or minute < self.end_min

    def __str__(self) -> str:
        return (f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-"
                f"{self.end_min // 60:02d}:{self.end_min % 60:02d}")


def parse_windows(windows: str, where: str = "download_windows") -> tuple[Window, ...]:
    """The windows of ``"01:00-05:00, 13:00-14:00"`` ("": none, any time), or ValueError
    naming the bad one and the form it must take."""
    out = []
    for text in filter(None, (t.strip() for t in windows.split(","))):
        m = _WINDOW.fullmatch(text.strip())
        hint = 'like "01:00-05:00" (local time; "22:00-04:00" spans midnight)'
        if m is None:
            raise ValueError(f"{where}: {text!r} is not a window; write HH:MM-HH:MM, {hint}")
        h1, m1, h2, m2 = map(int, m.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"{where}: {text!r} has no such time of day; hours 00-23 "
                             f"(24:00 only as an end), minutes 00-59")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError(f"{where}: {text!r} starts where it ends; for the whole day "
                             f"write \"00:00-24:00\" (or leave {where} empty)")
        out.append(Window(start, end))
    return tuple(out)


def in_windows(windows: tuple[Window, ...], now: datetime) -> bool:
    """True when no windows are set, or ``now`` (local time) lies in one of them."""
    minute = now.hour * 60 + now.minute
    return not windows or any(w.contains(minute) for w in windows)


def describe(windows: tuple[Window, ...]) -> str:
    return ", ".join(map(str, windows))
