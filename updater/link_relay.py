"""A relay in front of a real server on 127.0.0.1, for links that misbehave on purpose:
the flaky-link tests and the fleet simulation's slow, dropping links.

Each connection carries one HTTP GET: it is passed on whole to the upstream port and the
whole answer read back; then ``deliver(head, headers, body, client)`` decides what the
client gets (all of it, a cut, a reset, a stall, paced). Subclasses define ``deliver``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading

from updater.pacing import TokenBucket


class Relay(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: int):
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> Relay:
        """Serve in a thread of its own (``shutdown`` stops it)."""
        threading.Thread(target=self.serve_forever, name="link-relay", daemon=True).start()
        return self

    def deliver(self, head: bytes, headers: bytes, body: bytes,
                client: socket.socket) -> None:
        raise NotImplementedError


def is_target(head: bytes) -> bool:
    """Whether the request line asks for a release target (not metadata)."""
    return b"/targets/" in head.split(b"\r\n", 1)[0]


def reset(client: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a clean FIN."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class SlowDroppingLink(Relay):
    """A slow link that drops: every answer paced at ``bytes_per_s`` (a token bucket per
    connection), and each connection broken after ``drop_every`` body bytes, by a reset
    and a clean close in turn (the client resumes with Range). Counts what it sent."""

    def __init__(self, upstream: int, bytes_per_s: int, drop_every: int,
                 slice_bytes: int = 16384):
        self.bytes_per_s, self.drop_every, self.slice = bytes_per_s, drop_every, slice_bytes
        self.lock = threading.Lock()
        self.sent = 0  # body bytes sent
        self.breaks = 0
        super().__init__(upstream)

    def deliver(self, head, headers, body, client) -> None:
        cut = len(body) > self.drop_every
        payload = headers + b"\r\n\r\n" + (body[:self.drop_every] if cut else body)
        bucket = TokenBucket(self.bytes_per_s, burst=self.slice)
        try:
            for i in range(0, len(payload), self.slice):
                part = payload[i:i + self.slice]
                bucket.take(len(part))
                client.sendall(part)
        except OSError:
            return  # the client went away
        with self.lock:
            self.sent += len(payload) - len(headers) - 4
            self.breaks += cut
            by_reset = cut and self.breaks % 2 == 1
        if by_reset:
            reset(client)
        else:
            client.shutdown(socket.SHUT_WR)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        relay: Relay = self.server
        client = self.request
        client.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                return
            head += data
        # One request per connection: the answer ends with the close.
        head = head.replace(b"Connection: keep-alive", b"Connection: close")
        with socket.create_connection(("127.0.0.1", relay.upstream), 10) as up:
            up.sendall(head)
            answer = b""
            while chunk := up.recv(65536):
                answer += chunk
        headers, _, body = answer.partition(b"\r\n\r\n")
        relay.deliver(head, headers, body, client)
