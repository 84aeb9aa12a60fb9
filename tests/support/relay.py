"""A relay in front of a real server on 127.0.0.1, for links that misbehave on purpose.

Each connection carries one HTTP request: it is passed on whole to the upstream port and
the whole answer read back; then ``deliver(head, headers, body, client)`` decides what
the client gets (all of it, a cut, a reset, a stall). Subclasses define ``deliver``.
"""

from __future__ import annotations

import socket
import socketserver


class Relay(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: int):
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def deliver(self, head: bytes, headers: bytes, body: bytes,
                client: socket.socket) -> None:
        raise NotImplementedError


def is_target(head: bytes) -> bool:
    """Whether the request line asks for a release target (not metadata)."""
    return b"/targets/" in head.split(b"\r\n", 1)[0]


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
