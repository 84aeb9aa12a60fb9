"""updater/pacing.py with an injected clock: the token bucket's rate, and the download
windows (spanning midnight allowed, a window that starts where it ends refused); a bad
window in the config is one clear line naming the key."""

from __future__ import annotations

from datetime import datetime

import pytest

from appliance.config.settings import ConfigError
from updater.config import from_table
from updater.pacing import TokenBucket, in_windows, parse_windows


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.mark.parametrize("rate", [1000, 250_000, 10_000_000])
def test_the_bucket_holds_the_average_rate_from_the_first_byte(rate):
    clock = FakeClock()
    bucket = TokenBucket(rate, burst=65536, clock=clock, sleep=clock.sleep)
    total = 0
    for i in range(200):
        n = 4096 + (i * 7919) % 60000  # chunks of every size, as a socket gives them
        clock.t += 0.0001  # the time a read takes
        bucket.take(n)
        total += n
    assert total / clock.t == pytest.approx(rate, rel=0.01)


def test_the_bucket_lets_a_burst_through_after_idle_time_but_no_more():
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    clock.t = 100.0  # a long idle time earns the burst only
    assert bucket.take(500) == 0.0
    assert bucket.take(1000) == pytest.approx(1.0)


def _at(hhmm: str) -> datetime:
    h, m = map(int, hhmm.split(":"))
    return datetime(2026, 12, 6, h, m)


@pytest.mark.parametrize(("windows", "inside", "outside"), [
    ("01:00-05:00", ["01:00", "04:59"], ["00:59", "05:00", "12:00"]),
    ("22:00-04:00", ["22:00", "23:59", "00:00", "03:59"], ["04:00", "21:59", "12:00"]),
    ("00:00-24:00", ["00:00", "12:00", "23:59"], []),
    ("01:00-02:00, 13:00-14:30", ["01:30", "14:29"], ["02:00", "14:30"]),
    ("", ["00:00", "12:00"], []),
])
def test_windows_in_local_time_with_an_injected_clock(windows, inside, outside):
    parsed = parse_windows(windows)
    assert all(in_windows(parsed, _at(t)) for t in inside)
    assert not any(in_windows(parsed, _at(t)) for t in outside)


@pytest.mark.parametrize(("window", "message"), [
    ("1:00-5:00", "is not a window; write HH:MM-HH:MM"),
    ("01:00-05:00pm", "is not a window"),
    ("25:00-26:00", "no such time of day"),
    ("01:60-02:00", "no such time of day"),
    ("03:00-03:00", "starts where it ends; for the whole day write \"00:00-24:00\""),
])
def test_a_bad_window_is_one_clear_error_naming_the_key(window, message):
    table = {"fleet_url": "http://fleet:8470", "trusted_root": "/r.json",
             "download_windows": f"01:00-02:00, {window}"}
    with pytest.raises(ConfigError) as err:
        from_table(table, "outpost.toml")
    text = str(err.value)
    assert text.startswith("outpost.toml: updater.download_windows: ") and message in text
    assert "\n" not in text and repr(window) in text


def test_a_negative_cap_is_refused():
    with pytest.raises(ConfigError, match="max_download_bytes_per_s must be >= 0"):
        from_table({"fleet_url": "http://f", "trusted_root": "/r",
                    "max_download_bytes_per_s": -1}, "outpost.toml")
