"""The msgpack socket server: Unix socket by default, TCP when asked (DESIGN section 2).

``Connection`` only parses frames and maps and hands them to the ops (``socket_ops``:
each op's map into a ``Service`` call); responses are written as they complete, in any
order. Flow control: a connection stops being read
while it has ``max_inflight`` requests unanswered or its transport's write buffer is
full, and resumes at half of that.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import stat
from pathlib import Path

from appliance.config.schema import Config
from appliance.errors import (
    ConfigError,
    Internal,
    InvalidArgument,
    OutpostError,
    ResourceExhausted,
    Unavailable,
    error_from_wire,
)
from appliance.paths import parse_host_port
from appliance.protocol.frames import (
    HEADER,
    BufferedFrameReader,
    FrameError,
    decode_body,
    encode_frame,
    encode_frame_parts,
    error_response,
    has_big_tensor,
)
from appliance.protocol.tensors import encode_tensor
from appliance.scheduling.window import window_for
from appliance.serving.service import Service
from appliance.transport.busy_poll import BusyPoller
from appliance.transport.socket_ops import SocketOps, infer_request

log = logging.getLogger("outpost.server")


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: SocketServer, needs_hello: bool):
        self.server = server
        self.service = server.service
        self.reader = BufferedFrameReader(server.max_frame_bytes)
        self.needs_hello = needs_hello
        self.transport: asyncio.Transport | None = None
        self.pending: set = set()  # queued InferRequests, cancelled if the peer goes away
        self.inflight = 0
        self.max_inflight = server.max_inflight
        self.read_paused = False
        self.write_paused = False
        self.closed = False
        # Set by a framing error: nothing more is read, and the one error (then the close)
        # waits until every request read before it has been answered.
        self.broken: str | None = None
        # Responses finished in one loop iteration leave in one write (one syscall); those
        # answered while a read is handled leave at its end, without another iteration.
        self._out: list[bytes] = []
        self._reading = False
        self._loop = asyncio.get_running_loop()
        self._window = window_for(self._loop)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        if len(self.server.connections) > self.server.max_connections:
            self.fatal(None, f"too many connections (limit "
                             f"{self.server.max_connections}); retry later",
                       code="RESOURCE_EXHAUSTED")

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for request in self.pending:
            self.service.cancel(request)
        self.pending.clear()
        self.server.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._reading = True
        self._window.open()  # the frames of this read batch together
        broken = None
        try:
            self.reader.buffer_updated(nbytes, self._on_body)
        except FrameError as exc:  # a bad length, or a body that is not one map
            broken = exc
        finally:
            self._window.close()  # quick models answer here, inside the read
            self._reading = False
        if broken is not None:
            self._break(str(broken))
        elif self._out:
            self._flush()
        if not self.inflight and self.server.poller is not None:
            self.server.poller.extend()  # all answered: the next request may come soon

    def _on_body(self, body, owned: bool) -> None:
        if not self.closed:  # FrameError: up to buffer_updated
            self.handle(decode_body(body, borrow=owned))

    def _break(self, message: str) -> None:
        """The stream can't be trusted after a framing error: read no more of it, answer
        every request read before it (some may be on worker threads), then send the one
        error with id nil and close."""
        if self.closed:
            return
        self.broken = message
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._update_reading()

    def eof_received(self):
        # The peer finished sending; keep the socket open to answer what is in flight.
        if self.inflight:
            return True
        return False

    # -- requests --------------------------------------------------------------------------

    def handle(self, msg: dict) -> None:
        rid = msg.get("id")
        if type(rid) is not int or rid < 0:
            self.send(error_response(None, InvalidArgument(
                f"request 'id' must be an unsigned integer, got {rid!r}")))
            return
        op = msg.get("op")
        if self.needs_hello:
            if op != "hello":
                self.fatal(rid, "this connection must start with 'hello' carrying the "
                                "server's token", code="UNAUTHENTICATED")
                return
            token = msg.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(
                    token.encode(), self.server.token.encode()):
                self.fatal(rid, "hello carried a missing or wrong token; use the token "
                                "configured on the server", code="UNAUTHENTICATED")
                return
            self.needs_hello = False
        try:
            if op == "infer":
                self.infer(rid, msg)
                return
            ops = self.server.ops
            admin = ops.admin.get(op)
            if admin is not None:
                self.run_async(rid, op, admin(msg))
                return
            handler = ops.simple.get(op)
            if handler is None:
                raise InvalidArgument(f"unknown op {op!r}; this server knows "
                                      f"{', '.join(ops.names)}")
            fields = handler(msg)
        except OutpostError as exc:
            self.send(error_response(rid, exc))
            return
        except Exception as exc:  # a bug: answer it, keep the connection and the server
            log.exception("op failed", extra={"op": str(op)})
            self.send(error_response(rid, Internal(f"op {op!r} failed: {exc}")))
            return
        fields["id"] = rid
        fields["ok"] = True
        self.send(fields)

    def infer(self, rid: int, msg: dict) -> None:
        request = None

        def reply(response, error) -> None:
            nonlocal request
            self.inflight -= 1
            self.pending.discard(request)
            # The request holds this closure (its done callback) and this closure held
            # the request: a cycle that only the cyclic collector would free, with the
            # request's input buffers (600 KB a CNN image) waiting for it. Broken here, it
            # is freed the moment it is answered.
            request = None
            if error is not None:
                self.send(error_response(rid, error))
            else:
                try:
                    outputs = {n: encode_tensor(a) for n, a in response.outputs.items()}
                except OutpostError as exc:
                    self.send(error_response(rid, exc))
                else:
                    self.send({"model": response.model, "version": response.version,
                               "outputs": outputs, "id": rid, "ok": True},
                              has_big_tensor(outputs))
            if self.read_paused or self.server.stopping:
                self._update_reading()

        self.inflight += 1
        try:
            request = self.service.infer(infer_request(msg), reply, tag=self)
        except OutpostError as exc:
            self.inflight -= 1
            self.send(error_response(rid, exc))
            return
        except Exception as exc:
            self.inflight -= 1
            log.exception("infer failed")
            self.send(error_response(rid, Internal(f"infer failed: {exc}")))
            return
        if request is not None and self.inflight:
            self.pending.add(request)
        if self.inflight >= self.max_inflight:
            self._update_reading()

    def run_async(self, rid: int, op: str, coro) -> None:
        """An op that loads models: answered when done; the connection keeps serving."""
        self.inflight += 1

        def finished(task: asyncio.Task) -> None:
            self.inflight -= 1
            exc = task.exception() if not task.cancelled() else Unavailable("cancelled")
            if exc is None:
                fields = task.result()
                fields["id"] = rid
                fields["ok"] = True
                self.send(fields)
            elif isinstance(exc, OutpostError):
                self.send(error_response(rid, exc))
            else:
                log.error("op failed", exc_info=exc, extra={"op": op})
                self.send(error_response(rid, Internal(f"op {op!r} failed: {exc}")))
            self._update_reading()

        task = asyncio.get_running_loop().create_task(coro)
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)
        task.add_done_callback(finished)

    # -- output ----------------------------------------------------------------------------

    def send(self, message: dict, big: bool = False) -> None:
        """Queue a response; ``big``: it carries a large tensor (sent without a copy)."""
        if self.closed or self.transport is None:
            return
        try:
            parts = encode_frame_parts(message) if big else [encode_frame(message)]
        except Exception as exc:
            log.exception("encode failed")
            parts = [encode_frame(error_response(message.get("id"), Internal(
                f"the response could not be encoded: {exc}")))]
        size = len(parts[0]) - 4 if len(parts) == 1 else HEADER.unpack_from(parts[0])[0]
        if size > self.server.max_frame_bytes:
            parts = [encode_frame(error_response(message.get("id"), ResourceExhausted(
                f"the response would be {size} bytes, over the frame limit of "
                f"{self.server.max_frame_bytes}; ask for fewer outputs or a smaller batch")))]
        if not self._out and not self._reading:
            self._loop.call_soon(self._flush)
        self._out.extend(parts)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed and self.transport is not None and not \
                self.transport.is_closing():
            self.transport.writelines(out)

    def fatal(self, rid, message: str, code: str = "INVALID_ARGUMENT") -> None:
        """Answer once, then close: the stream (or the peer) can't be trusted any more."""
        self.send(error_response(rid, error_from_wire({"code": code, "message": message})))
        self.close()

    def close(self) -> None:
        """Close after writing every response already made (the transport sends its own
        buffer before it closes; ours must reach it first)."""
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        if self.broken is not None:  # reading stays paused; close once all are answered
            if not self.inflight:
                self.fatal(None, self.broken)
            return
        should_pause = self.write_paused or self.inflight >= self.max_inflight
        if should_pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif (not should_pause and self.read_paused
              and self.inflight <= self.max_inflight // 2):
            self.read_paused = False
            self.transport.resume_reading()
        if not self.inflight and self.server.stopping:
            self.close()


class SocketServer:
    """Listeners and connections; ``stop`` drains gracefully."""

    def __init__(self, service: Service, config: Config):
        self.service = service
        self.config = config
        self.max_frame_bytes = config.server.max_frame_bytes
        self.max_inflight = config.server.max_inflight_per_connection
        self.max_connections = config.server.max_connections
        self.token = config.token()
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.stopping = False
        self._all_gone: asyncio.Event | None = None
        self.ops = SocketOps(service, self.max_frame_bytes)
        self.tasks: set[asyncio.Task] = set()
        self.socket_path = Path(config.server.socket_path)
        self.tcp_address: tuple[str, int] | None = None
        self.poller: BusyPoller | None = None  # made in start(), on the serving loop

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.server.busy_poll_us:
            self.poller = BusyPoller(loop, self.config.server.busy_poll_us, window_for(loop))
        if self.config.server.tcp and not self.token:  # refuse before listening at all
            raise ConfigError(
                "server.tcp is set but no token is configured: TCP connections must "
                "authenticate; set server.token, server.token_file or OUTPOST_TOKEN")
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(path)
        unix = await loop.create_unix_server(
            lambda: Connection(self, needs_hello=bool(self.token)), str(path), backlog=1024)
        os.chmod(path, int(self.config.server.socket_mode, 8))
        self.listeners.append(unix)
        if self.config.server.tcp:
            host, port = parse_host_port(self.config.server.tcp, "server.tcp")
            tcp = await loop.create_server(lambda: Connection(self, needs_hello=True),
                                           host, port, backlog=1024)
            self.listeners.append(tcp)
            sockname = tcp.sockets[0].getsockname()
            self.tcp_address = (sockname[0], sockname[1])
            for s in tcp.sockets:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def stop(self) -> None:
        """Stop accepting; answer what is in flight; close idle connections."""
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            if not conn.inflight and conn.transport is not None:
                conn.close()  # answers finished this very loop pass still go out
        if self.connections:
            self._all_gone = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_gone.wait(),
                                       self.config.server.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timed out", extra={"connections": len(self.connections)})
                for conn in list(self.connections):
                    if conn.transport is not None:
                        conn.transport.abort()
        try:
            if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        except OSError:
            pass

    def connection_gone(self) -> None:
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one's."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; remove it or choose another "
                          f"server.socket_path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ConfigError(f"another server is serving on {path}; stop it or choose another "
                      f"server.socket_path")

