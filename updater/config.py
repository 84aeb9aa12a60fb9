"""The device's ``[updater]`` config section: one frozen dataclass, units in the names.

``appliance.config`` keeps the section as a plain table; ``from_table`` turns it into
this dataclass with the same clear errors (unknown key, wrong type) as the rest.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from updater.pacing import parse_windows


@dataclass(frozen=True)
class UpdaterConfig:
    fleet_url: str = ""  # http(s)://host:port/ of the fleet server (or any static mirror)
    report_url: str = ""  # "": fleet_url; the fleet server taking POST /v1/reports
    # (set it when fleet_url is a static host: nginx, a CDN, an object store)
    report_key_file: str = ""  # this device's report key ('outpost fleet device-key')
    trusted_root: str = ""  # the fleet's root.json, copied in on first start
    device_id: str = ""  # "": this host's name
    labels: dict[str, str] = field(default_factory=dict)
    poll_interval_s: float = 300.0
    poll_jitter_s: float = 30.0  # each wait is poll_interval_s + uniform(0, jitter)
    health_window_s: float = 60.0  # watch the new version this long before commit
    health_max_error_rate_increase: float = 0.05  # vs the previous version's error rate
    health_max_latency_ratio: float = 2.0  # p50 latency vs the previous version's
    health_min_requests: int = 20  # fewer requests in the window: judged on errors only
    max_watch_restarts: int = 1  # a crash during the watch more often than this: roll back
    download_chunk_bytes: int = 65536
    http_timeout_s: float = 30.0  # also the longest a stalled download waits for a byte
    max_release_bytes: int = 2 << 30
    max_download_bytes_per_s: int = 0  # 0: no cap; else a token bucket paces downloads
    download_windows: str = ""  # local "HH:MM-HH:MM", comma-separated; "": any time
    download_attempts: int = 5  # per pass: a link that drops is resumed this often
    max_queued_reports: int = 1000  # kept while offline; past it the oldest are dropped

    def check(self) -> None:
        check_url("fleet_url", self.fleet_url, "the fleet server or the static host "
                  "that serves metadata/ and targets/")
        if self.report_url:
            check_url("report_url", self.report_url, "the fleet server that takes "
                      "reports (outpost fleet serve)")
        if not self.trusted_root:
            raise ValueError("trusted_root must name the fleet's root.json (from "
                             "'outpost fleet init')")
        for k in ("poll_interval_s", "poll_jitter_s", "health_window_s", "http_timeout_s"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")
        if self.download_chunk_bytes < 1024 or self.max_release_bytes < 1:
            raise ValueError("download_chunk_bytes must be >= 1024 and max_release_bytes >= 1")
        if self.max_download_bytes_per_s < 0:
            raise ValueError("max_download_bytes_per_s must be >= 0 (0: no cap)")
        if self.download_attempts < 1 or self.max_queued_reports < 1:
            raise ValueError("download_attempts and max_queued_reports must be >= 1")
        parse_windows(self.download_windows)  # its error names the bad window

    @property
    def windows(self):
        return parse_windows(self.download_windows)

    @property
    def device(self) -> str:
        return self.device_id or socket.gethostname()

    @property
    def reports_endpoint(self) -> str:
        base = (self.report_url or self.fleet_url).rstrip("/")
        return base if base.endswith("/v1/reports") else base + "/v1/reports"


def check_url(key: str, url: str, what: str) -> None:
    """Raise one error naming the key, the URL and what it must be, unless ``url`` is an
    http(s) base URL."""
    why = _url_problem(url)
    if why:
        shown = re.sub(r"//[^/@]*@", "//***@", url)  # a password is not echoed to logs
        raise ValueError(f"{key} {shown!r}: {why}; it must be the http(s) URL of {what}, "
                         f"like https://fleet.example.com:8470")


def _url_problem(url: str) -> str | None:
    if any(c.isspace() or not c.isprintable() for c in url):
        return "it holds a space or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is no number or out of range raises here
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return "not an http:// or https:// URL"
    if not parts.hostname or port == 0:
        return "no host" if not parts.hostname else "port 0"
    if parts.username is not None:
        return "a user name or password does not belong in it"
    if "?" in url or "#" in url:
        return "a base URL takes no query or fragment"
    return None


def from_table(table: dict, where: str = "config") -> UpdaterConfig:
    from appliance.config.settings import from_mapping  # noqa: PLC0415

    return from_mapping(UpdaterConfig, table, where, prefix="updater.")


def trusted_root_bytes(config: UpdaterConfig) -> bytes:
    from updater.errors import TrustError  # noqa: PLC0415

    try:
        return Path(config.trusted_root).expanduser().read_bytes()
    except OSError as exc:
        raise TrustError(f"updater.trusted_root {config.trusted_root}: can't be read "
                         f"({exc.strerror}); copy the fleet's metadata/1.root.json here"
                         ) from exc


def report_key(config: UpdaterConfig) -> bytes | None:
    """The device's report key, or None when none is configured (reports go unsigned)."""
    from updater.errors import TrustError  # noqa: PLC0415
    from updater.report_auth import parse_key  # noqa: PLC0415

    if not config.report_key_file:
        return None
    path = Path(config.report_key_file).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise TrustError(f"updater.report_key_file {path}: can't be read ({exc.strerror}); "
                         f"write the key 'outpost fleet device-key' prints there") from exc
    try:
        return parse_key(text, f"updater.report_key_file {path}")
    except ValueError as exc:
        raise TrustError(str(exc)) from exc
