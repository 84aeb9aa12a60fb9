"""The msgpack socket server: Unix socket by default, TCP when asked (DESIGN section 2).

``Connection`` only parses frames and maps and hands them to the ops (``socket_ops``:
each op's map into a ``Service`` call); responses are written as they complete, in any
order. Flow control: a connection stops being read
while it has ``max_inflight`` requests unanswered or its transport's write buffer is
full, and resumes at half of that.

Timers, none of them on the way of a whole frame: a read that leaves a frame partly
received starts the stall clock (``server.stall_timeout_s``, restarted by each read of
that frame; a timer that finds the frame whole does nothing); a peer that reads none of
its answers for that long is cut too. ``server.idle_timeout_s`` (0: never) closes a
connection with nothing in flight; only connections of that server count their reads
(``_IdleConnection``).
Errors: a bug answers INTERNAL with a fixed message, its traceback logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import os
import socket
import stat
from pathlib import Path

import msgpack

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
from appliance.transport.socket_ops import OutputRegions, SocketOps, infer_request

log = logging.getLogger("outpost.server")

# What a bug answers: the exception's text is for the log, not for the client.
INTERNAL_MESSAGE = "internal error; see the server log"

# When the drain ends, the answers it leaves (UNAVAILABLE) get this long to be written
# before the connections left are aborted.
_LAST_WRITES_S = 0.1

# Draining, how often a connection kept for a frame partly received is looked at
_DRAIN_POLL_S = 0.02


SOCKET_OK, SOCKET_INTERNAL = ("socket", "OK"), ("socket", "INTERNAL")


class _ClosedReader:
    """A closed connection's reader: no frame pending, no buffers held."""

    _end = 0
    _big = None


_CLOSED_READER = _ClosedReader()


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: SocketServer, needs_hello: bool):
        self.server = server
        self.service = server.service
        self.reader = BufferedFrameReader(server.max_frame_bytes)
        self.needs_hello = needs_hello
        self.transport: asyncio.Transport | None = None
        # Queued requests and their ids: cancelled if the peer goes away, answered
        # UNAVAILABLE if the drain ends first.
        self.pending: dict = {}
        self.inflight = 0
        self.max_inflight = server.max_inflight
        self.read_paused = False
        self.peer_done = False  # the peer sent EOF: close once all is answered
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
        self._broken_code = "INVALID_ARGUMENT"
        # The stall clocks: a frame partly received (armed by a read that leaves it so;
        # not stopped when it is whole, the timer then finds nothing to do), and answers
        # the peer does not read (armed by pause_writing, or by a close with bytes left).
        self._stall: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._write_stall: asyncio.TimerHandle | None = None
        self._write_mark = 0

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        if len(self.server.connections) > self.server.max_connections:
            self.server.refusals.refused()
            self.fatal(None, f"too many connections (server.max_connections = "
                             f"{self.server.max_connections}); retry later",
                       code="RESOURCE_EXHAUSTED")

    def connection_lost(self, exc) -> None:
        self.closed = True
        for timer in (self._stall, self._write_stall):
            if timer is not None:
                timer.cancel()
        self._stall = self._write_stall = None
        self.server.connections.discard(self)
        for request in self.pending:
            self.service.cancel(request)
        self.pending.clear()
        self.service.shared_memory.release(self)  # what it registered goes with it
        # The transport held this protocol and this protocol the transport: a cycle, freed
        # only when the cyclic collector reached the old generation it had grown into,
        # with the reader's buffers (256 KiB, or a large frame's) held till then.
        self.transport = None
        self.reader = _CLOSED_READER
        self.server.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._watch_writes()
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._reading = True
        self._window.open()  # the frames of this read batch together
        reader = self.reader
        broken = None
        try:
            reader.buffer_updated(nbytes, self._on_body)
        except FrameError as exc:  # a bad length, or a body that is not one map
            # The message, not the exception: its traceback holds this frame, which
            # holds it, a cycle of the connection only the cyclic collector would free.
            broken = _frame_error_message(exc)
        finally:
            self._window.close()  # quick models answer here, inside the read
            self._reading = False
        if broken is not None:
            self._break(broken)
        else:
            # A frame partly here? The reader's own fields (nothing else tells, and a
            # property would cost a call on every read): bytes after the last whole
            # frame, or a large frame's buffer being filled. The clock is not stopped
            # when the frame completes: its timer finds nothing to do when it fires.
            if reader._end or reader._big is not None:
                self._partial_read()
            if self._out:
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

    # -- stalls ----------------------------------------------------------------------------

    def mid_frame(self) -> bool:
        """Whether some of a frame has been received and the rest has not."""
        return bool(self.reader._end) or self.reader._big is not None

    def _partial_read(self) -> None:
        """This read left a frame partly received: (re)start its stall clock."""
        self._last_data = now = self._loop.time()
        if self._stall is None:
            self._stall = self._loop.call_at(now + self.server.stall_timeout_s,
                                             self._check_stall)
        if self.server.stopping and not self.inflight and self._out:
            # Draining: the frames this read completed were answered; the one begun
            # after them is not taken.
            self.close()

    def close_when_answered(self) -> None:
        """Draining, kept for a frame partly received: close once it is whole and
        answered (UNAVAILABLE), looked at every few milliseconds."""
        if self.closed:
            return
        if not self.inflight and not self.mid_frame():
            self.close()
            return
        self._loop.call_later(_DRAIN_POLL_S, self.close_when_answered)

    def _check_stall(self) -> None:
        self._stall = None
        if self.closed or self.broken is not None or not self.mid_frame():
            return
        timeout = self.server.stall_timeout_s
        now = self._loop.time()
        if self.read_paused:  # not read by the server: its time does not count
            self._last_data = now
        due = self._last_data + timeout
        if now < due:  # more of the frame came since the clock was set
            self._stall = self._loop.call_at(due, self._check_stall)
            return
        log.debug("stalled connection closed", extra={"transport": "socket"})
        self._broken_code = "DEADLINE_EXCEEDED"
        self._break(f"a frame was begun but no more of it came for server.stall_timeout_s "
                    f"= {timeout:g} s; closing: send each frame whole, without pausing")

    def _watch_writes(self) -> None:
        """Answers are waiting for the peer to read them (writing paused, or a close with
        bytes left): if it reads none of them for server.stall_timeout_s, cut it."""
        if self._write_stall is None and self.transport is not None:
            self._write_mark = self.transport.get_write_buffer_size()
            self._write_stall = self._loop.call_later(self.server.stall_timeout_s,
                                                      self._check_writes)

    def _check_writes(self) -> None:
        self._write_stall = None
        transport = self.transport
        if transport is None:
            return
        waiting = transport.get_write_buffer_size()
        if not waiting or not (self.write_paused or self.closed):
            return
        if waiting != self._write_mark:  # the peer read some, or answers are still coming
            self._watch_writes()
            return
        log.debug("connection not reading its answers cut", extra={"transport": "socket",
                                                                   "bytes": waiting})
        self.closed = True
        transport.abort()

    def eof_received(self):
        # The peer finished sending: answer what is in flight, then close. Nothing more is
        # read, so its own close would go unseen: the connection, its descriptor and its
        # buffers stayed open for good once its last answer was written.
        self.peer_done = True
        return bool(self.inflight)

    # -- requests --------------------------------------------------------------------------

    def handle(self, msg: dict) -> None:
        rid = op = None
        try:
            rid = msg.get("id")
            if type(rid) is not int or rid < 0:
                bad, rid = rid, None
                raise InvalidArgument(f"request 'id' must be an unsigned integer, got {bad!r}")
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
            if op == "infer":
                self.infer(rid, msg)
                return
            ops = self.server.ops
            admin = ops.admin.get(op)
            if admin is not None:
                self.run_async(rid, op, admin(msg))
                return
            handler = ops.simple.get(op)
            if handler is not None:
                fields = handler(msg)
            elif op in ops.per_connection:
                fields = ops.per_connection[op](msg, self)
            else:
                raise InvalidArgument(f"unknown op {op!r}; this server knows "
                                      f"{', '.join(ops.names)}")
        except OutpostError as exc:
            self.send(error_response(rid, exc))
            return
        except Exception:  # a bug: answer it, keep the connection and the server
            log.exception("op failed", extra={"op": _op_name(op)})
            self.send(error_response(rid, Internal(INTERNAL_MESSAGE)))
            return
        fields["id"] = rid
        fields["ok"] = True
        self.send(fields)

    def infer(self, rid: int, msg: dict) -> None:
        request = None
        counts = self.server.counts
        into_regions = None
        if "output_shm" in msg:
            try:
                into_regions = OutputRegions(msg, self.service.shared_memory)
            except OutpostError as exc:
                counts[("socket", exc.code)] += 1
                self.send(error_response(rid, exc))
                return

        def reply(response, error) -> None:
            nonlocal request
            self.inflight -= 1
            self.pending.pop(request, None)
            # The request holds this closure (its done callback) and this closure held
            # the request: a cycle that only the cyclic collector would free, with the
            # request's input buffers (600 KB a CNN image) waiting for it. Broken here, it
            # is freed the moment it is answered.
            request = None
            if error is not None:
                counts[("socket", error.code)] += 1
                self.send(error_response(rid, error))
            else:
                try:
                    outputs = ({n: encode_tensor(a) for n, a in response.outputs.items()}
                               if into_regions is None
                               else into_regions.encode(response.outputs, encode_tensor))
                except OutpostError as exc:
                    counts[("socket", exc.code)] += 1
                    self.send(error_response(rid, exc))
                except Exception:
                    log.exception("encoding the outputs failed", extra={"op": "infer"})
                    counts[SOCKET_INTERNAL] += 1
                    self.send(error_response(rid, Internal(INTERNAL_MESSAGE)))
                else:
                    counts[SOCKET_OK] += 1
                    self.send({"model": response.model, "version": response.version,
                               "outputs": outputs, "id": rid, "ok": True},
                              has_big_tensor(outputs))
            if self.read_paused or self.server.stopping or self.peer_done:
                self._update_reading()

        self.inflight += 1
        try:
            request = self.service.infer(infer_request(msg, self.service.shared_memory),
                                         reply, tag=self)
        except OutpostError as exc:
            self.inflight -= 1
            counts[("socket", exc.code)] += 1
            self.send(error_response(rid, exc))
            return
        except Exception:
            self.inflight -= 1
            log.exception("op failed", extra={"op": "infer"})
            counts[SOCKET_INTERNAL] += 1
            self.send(error_response(rid, Internal(INTERNAL_MESSAGE)))
            return
        if request is not None and self.inflight:
            self.pending[request] = rid
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
                self.send(error_response(rid, Internal(INTERNAL_MESSAGE)))
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
        except Exception:
            log.exception("encode failed")
            parts = [encode_frame(error_response(message.get("id"),
                                                 Internal(INTERNAL_MESSAGE)))]
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
            if self.transport.get_write_buffer_size():  # not forever, for a peer not reading
                self._watch_writes()

    def give_up(self, why: str) -> None:
        """The drain is over: answer what is still in flight UNAVAILABLE (a result that
        comes later is dropped), say why with id nil, and close."""
        pending, self.pending = self.pending, {}
        for request, rid in pending.items():
            self.service.cancel(request)
            self.send(error_response(rid, Unavailable(why)))
        self.inflight = 0
        self.fatal(None, why, code="UNAVAILABLE")

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        if self.broken is not None:  # reading stays paused; close once all are answered
            if not self.inflight:
                self.fatal(None, self.broken, code=self._broken_code)
            return
        should_pause = self.write_paused or self.inflight >= self.max_inflight
        if should_pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif (not should_pause and self.read_paused
              and self.inflight <= self.max_inflight // 2):
            self.read_paused = False
            self.transport.resume_reading()
        if not self.inflight and (self.server.stopping or self.peer_done):
            self.close()


class _IdleConnection(Connection):
    """A connection closed after server.idle_timeout_s with nothing in flight. Only a
    server with that timeout makes these, so the default's reads note nothing."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._last_read = self._loop.time()
        self._idle = self._loop.call_at(self._last_read + self.server.idle_timeout_s,
                                        self._check_idle)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_read = self._loop.time()
        super().buffer_updated(nbytes)

    def connection_lost(self, exc) -> None:
        self._idle.cancel()
        super().connection_lost(exc)

    def _check_idle(self) -> None:
        if self.closed:
            return
        timeout = self.server.idle_timeout_s
        now = self._loop.time()
        if self.inflight or self.mid_frame() or self.broken is not None:
            due = now + timeout  # busy: idle time starts once it is not
        else:
            due = self._last_read + timeout
        if now < due:
            self._idle = self._loop.call_at(due, self._check_idle)
            return
        self.fatal(None, f"idle for server.idle_timeout_s = {timeout:g} s; closed "
                         f"(connect again)", code="UNAVAILABLE")


class RefusalLog:
    """Connections refused by a transport's limit: logged at once, then at most once a
    minute, each line counting the refusals since the one before."""

    INTERVAL_S = 60.0

    def __init__(self, transport: str, setting: str, limit: int):
        self.transport, self.setting, self.limit = transport, setting, limit
        self.count = 0
        self._last = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def refused(self) -> None:
        self.count += 1
        loop = asyncio.get_running_loop()
        due = self._last + self.INTERVAL_S
        if loop.time() >= due:
            self._emit()
        elif self._timer is None:
            self._timer = loop.call_at(due, self._emit)

    def _emit(self) -> None:
        self._timer = None
        if self.count:
            log.warning("connections refused: over the limit", extra={
                "transport": self.transport, "refused": self.count, "setting": self.setting,
                "limit": self.limit})
            self.count = 0
            self._last = asyncio.get_running_loop().time()


class SocketServer:
    """Listeners and connections; ``stop`` drains gracefully."""

    def __init__(self, service: Service, config: Config):
        self.service = service
        self.config = config
        self.max_frame_bytes = config.server.max_frame_bytes
        self.max_inflight = config.server.max_inflight_per_connection
        self.max_connections = config.server.max_connections
        self.stall_timeout_s = config.server.stall_timeout_s
        self.idle_timeout_s = config.server.idle_timeout_s
        self.refusals = RefusalLog("socket", "server.max_connections", self.max_connections)
        self.token = config.token()
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.stopping = False
        self._all_gone: asyncio.Event | None = None
        self.ops = SocketOps(service, self.max_frame_bytes)
        self.counts = service.protocol_counts.counts
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
        kind = _IdleConnection if self.idle_timeout_s else Connection
        unix = await loop.create_unix_server(
            lambda: kind(self, needs_hello=bool(self.token)), str(path), backlog=1024)
        os.chmod(path, int(self.config.server.socket_mode, 8))
        self.listeners.append(unix)
        if self.config.server.tcp:
            host, port = parse_host_port(self.config.server.tcp, "server.tcp")
            tcp = await loop.create_server(lambda: kind(self, needs_hello=True),
                                           host, port, backlog=1024)
            self.listeners.append(tcp)
            sockname = tcp.sockets[0].getsockname()
            self.tcp_address = (sockname[0], sockname[1])
            for s in tcp.sockets:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def stop(self) -> None:
        """Stop accepting; close idle connections at once; answer what is in flight (a
        request that arrives meanwhile is answered UNAVAILABLE, then its connection
        closed); at the drain timeout, abort the connections left."""
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        for conn in list(self.connections):
            if conn.inflight or conn.transport is None:
                continue  # closed by its last answer (_update_reading)
            if conn.mid_frame():
                conn.close_when_answered()
            else:
                conn.close()  # answers finished this very loop pass still go out
        if self.connections:
            self._all_gone = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_gone.wait(),
                                       self.config.server.drain_timeout_s)
            except TimeoutError:
                left = list(self.connections)
                log.warning("drain timed out: connections closed", extra={
                    "transport": "socket", "connections": len(left),
                    "inflight": sum(c.inflight for c in left)})
                why = (f"the server stopped: server.drain_timeout_s = "
                       f"{self.config.server.drain_timeout_s:g} s passed first; retry "
                       f"against its successor")
                for conn in left:
                    if not conn.closed:
                        conn.give_up(why)
                with contextlib.suppress(TimeoutError):  # the answers leave, for a reader
                    await asyncio.wait_for(self._all_gone.wait(), _LAST_WRITES_S)
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


def _op_name(op) -> str:
    """An op for the log: its name, or the type of what came instead (never its repr)."""
    return op if isinstance(op, str) else type(op).__name__


def _frame_error_message(exc: FrameError) -> str:
    if isinstance(exc.__cause__, msgpack.StackError):
        return ("frame nests maps and arrays deeper than msgpack's limit of 1024 levels; "
                "send flatter requests")
    return str(exc)


def check_socket_free(path: Path) -> None:
    """Before a server loads anything: stop with one line if another one serves on
    ``path`` (a stale file from a dead server is removed)."""
    _clear_stale_socket(path)


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

