"""The one network seam: metadata for the TUF client, ranged target downloads, reports.

Blocking (urllib); the agent calls it from a worker thread. Every foreign error leaves
as ``tuf.api.exceptions.DownloadError`` (for ngclient) or ``FetchError``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from updater.errors import FetchError

CHUNK = 65536


class Fetcher(FetcherInterface):
    def __init__(self, timeout_s: float = 30.0, chunk_bytes: int = CHUNK):
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes

    def _open(self, url: str, headers: dict | None = None):
        req = urllib.request.Request(url, headers={"User-Agent": "outpost-updater",
                                                   **(headers or {})})
        return urllib.request.urlopen(req, timeout=self.timeout_s)  # noqa: S310

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self._open(url)
        except urllib.error.HTTPError as exc:
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        return self._chunks(resp, url)

    def _chunks(self, resp, url: str) -> Iterator[bytes]:
        with resp:
            while True:
                try:
                    chunk = resp.read(self.chunk_bytes)
                except OSError as exc:
                    raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
                if not chunk:
                    # http.client ends a body the server closed early with b"" and no
                    # error; bytes still owed by Content-Length are a broken download
                    # (resumed with Range), not a whole file that fails its hash.
                    if resp.length:
                        raise tuf_exc.DownloadError(
                            f"{url}: the server closed the connection {resp.length} bytes "
                            f"short of its Content-Length")
                    return
                yield chunk

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """The bytes of ``url`` from ``offset`` on: (the offset they really start at, chunks).

        A server that ignores Range answers 200 with the whole file: offset 0.
        """
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self._open(url, headers)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # the partial file is already whole (or longer)
                return offset, iter(())
            raise FetchError(f"{url}: HTTP {exc.code} from the fleet") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise FetchError(f"{url}: the fleet is unreachable ({exc})") from exc
        start = offset if resp.status == 206 else 0
        return start, self._chunks(resp, url)

    def post_json(self, url: str, body: dict,
                  sign: Callable[[bytes], dict] | None = None) -> dict:
        """POST ``body`` as JSON; ``sign(data)`` gives headers that authenticate the bytes."""
        data = json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "outpost-updater",
            **(sign(data) if sign is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode(errors="replace")
            raise FetchError(f"{url}: HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FetchError(f"{url}: the fleet is unreachable ({exc})") from exc
