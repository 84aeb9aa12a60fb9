"""The HTTP listener: an aiohttp app on the socket server's event loop.

Limits live here, answered before any work: past ``max_connections`` open connections a
new one is answered 503 and closed; past ``max_inflight`` concurrent POSTs a 503; a body
over ``max_body_bytes`` a 413 without reading it; ``request_timeout_s`` bounds each infer
(routes.py). Each connection is aiohttp's protocol with a stall clock
(``HttpConnection``): a client that owes the server part of a request (its head, or the
rest of its body) and sends nothing for ``server.stall_timeout_s`` is answered 408 and
closed; one idle between requests is closed after ``http.idle_timeout_s`` (aiohttp's
keep-alive). ``stop`` stops accepting, closes idle connections at once, answers what is
in flight (a request that starts meanwhile: 503), closing each connection after its
answer, and aborts what is left at the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from appliance.config.schema import Config
from appliance.errors import ConfigError, OutpostError, Unavailable
from appliance.paths import parse_host_port
from appliance.serving.service import Service
from appliance.transport.http.control import ModelControl
from appliance.transport.http.errors import (
    INTERNAL_MESSAGE,
    error_response,
    outpost_error_response,
    raw_error_response,
)
from appliance.transport.http.metrics import make_registry
from appliance.transport.http.routes import (
    PayloadTooLarge,
    Routes,
    not_found_route,
    too_large_message,
)
from appliance.transport.socket_server import RefusalLog

log = logging.getLogger("outpost.http")

# aiohttp's parser limits (its defaults), named in the 400 a request over them gets
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128

# After the drain, what is left of a handler (its connection already closed) is
# cancelled this soon: aiohttp takes 0 to mean no limit at all.
_CLEANUP_S = 0.1

# When the drain ends, the answers it leaves (503) get this long to be written before
# the connections left are aborted.
_LAST_WRITES_S = 0.1


class HttpConnection(web.RequestHandler):
    """One client connection: aiohttp's protocol, plus what the client owes.

    A head, from the connection's start and from the first byte after an answer
    (``head_since``; ``head_bytes``: some of it came); the rest of a body while the
    request's payload is not at its end (``last_data``: when bytes last came); nothing
    while idle between requests, or while the server works on a request (``request``:
    from the middleware's start until its answer is written). The stall timer is armed
    once per stall period at most and checks which it is when it fires. Known gap: a
    head pipelined behind a whole request in the same read is not clocked (aiohttp's
    keep-alive timer still closes it)."""

    __slots__ = ("owner", "raw_transport", "request", "answering", "payload", "head_since",
                 "head_bytes", "last_data", "stall_timer")

    def __init__(self, owner: HttpServer, manager: web.Server,
                 loop: asyncio.AbstractEventLoop):
        super().__init__(manager, loop=loop, keepalive_timeout=owner.http.idle_timeout_s,
                         access_log=None, max_line_size=MAX_LINE_BYTES,
                         max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS)
        self.owner = owner
        self.raw_transport: asyncio.Transport | None = None
        self.request: web.BaseRequest | None = None
        self.answering = False  # the request's answer is made: aiohttp writes it
        self.payload = None  # the request's body stream, until it is at its end
        self.head_since: float | None = None
        self.head_bytes = False
        self.last_data = 0.0
        self.stall_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.raw_transport = transport
        if self.owner.connection_made(self):
            self.head_since = self._loop.time()  # the first request must come in time
            self._arm(self.head_since)

    def connection_lost(self, exc) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        self.owner.connection_lost(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:  # aiohttp calls it with b"" to parse what it held while paused
            now = self._loop.time()
            payload = self.payload
            if payload is not None and not payload.is_eof():  # the body coming
                self.last_data = now
            elif not self.head_bytes:  # the first bytes of the next head
                self.head_bytes = True
                if self.head_since is None:
                    self.head_since = now
            if self.stall_timer is None:
                self._arm(now)
        super().data_received(data)

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        """aiohttp's answer where no route answered: a request it could not parse (400),
        or an error past the middleware. The v2 error body; a 500 never carries the
        exception's text."""
        if request.writer.output_size > 0:  # as aiohttp: too late for another answer
            raise ConnectionError("the response was begun; no other can be sent")
        if status >= 500:
            if self.raw_transport is not None and not self.raw_transport.is_closing():
                log.error("http request failed", exc_info=exc)
            text = INTERNAL_MESSAGE
        else:
            text = parse_error_message(exc, message)
        return error_response(status, text, close=True)

    async def finish_response(self, request, resp, start_time):
        try:
            return await super().finish_response(request, resp, start_time)
        finally:  # the answer is written
            self._request_finished()

    # -- the request's life ---------------------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        """Told by the middleware: the head is whole, the handler runs."""
        self.request = request
        self.payload = request.content
        self.head_since = None
        self.head_bytes = False
        self.last_data = self._loop.time()

    def _request_finished(self) -> None:
        self.request = None
        self.answering = False
        if self.owner.draining:  # an answer is a connection's last
            self.force_close()
            return
        if self.payload is not None and self.payload.is_eof():
            self.payload = None
        if self.head_since is not None:  # a next head began meanwhile: its clock starts now
            self.head_since = self._loop.time()
            if self.stall_timer is None:
                self._arm(self.head_since)

    def idle(self) -> bool:
        """No request begun, none being answered (a body left unread by an answer may
        still be arriving, to be discarded); a connection that never sent a byte too."""
        return self.request is None and not self.head_bytes

    def refuse(self, answer: bytes) -> None:
        if self.raw_transport is not None:
            self.raw_transport.write(answer)
        self.force_close()

    def give_up(self, answer: bytes) -> None:
        """The drain is over: a request begun and not answered gets ``answer`` (a 503),
        and the connection closes."""
        transport = self.raw_transport
        if transport is None or transport.is_closing():
            return
        unanswered = self.head_bytes if self.request is None else not self.answering
        if unanswered:
            transport.write(answer)
        self.force_close()

    def abort(self) -> None:
        if self.raw_transport is not None:
            self.raw_transport.abort()

    # -- stalls ---------------------------------------------------------------------------

    def _arm(self, now: float) -> None:
        self.stall_timer = self._loop.call_at(now + self.owner.stall_timeout_s, self._check)

    def _check(self) -> None:
        self.stall_timer = None
        if self.transport is None:
            return
        payload = self.payload
        if payload is not None and not payload.is_eof():
            since, what = self.last_data, "body"
            # Unanswered: else an answer made without reading it all is out (or going)
            answer = self.request is not None and not self.answering
        elif self.request is None and self.head_since is not None:
            since, what = self.head_since, "head"
            answer = self.head_bytes  # a connection that never sent a byte just closes
        else:  # idle, or the server's turn
            return
        timeout = self.owner.stall_timeout_s
        now = self._loop.time()
        if self._reading_paused or getattr(self, "_buffer_paused", False):
            # aiohttp is not reading (its buffers are full): the server's time, not the
            # client's (BaseProtocol's own flags)
            self.last_data = now
            if what == "head":
                self.head_since = now
            since = now
        due = since + timeout
        if now < due:
            self.stall_timer = self._loop.call_at(due, self._check)
            return
        log.debug("stalled connection closed", extra={"transport": "http", "part": what})
        if answer and self.raw_transport is not None:
            self.raw_transport.write(raw_error_response(408, (
                f"the request's {what} stopped arriving for server.stall_timeout_s = "
                f"{timeout:g} s; send each request whole, without pausing")))
        self.force_close()


def parse_error_message(exc, message: str | None) -> str:
    """A 400 for a request aiohttp could not parse: its own words, or the limit passed."""
    if isinstance(exc, LineTooLong):
        return (f"a request line or header is over {MAX_LINE_BYTES} bytes, this server's "
                f"limit; send shorter ones")
    text = exc.message if isinstance(exc, BadHttpMessage) else (message or "")
    if "Too many headers" in text:
        return f"the request has over {MAX_HEADERS} headers, this server's limit"
    first = text.strip().splitlines()[0][:200] if text.strip() else "unreadable"
    return f"the request is not valid HTTP/1.1: {first}"


class HttpServer:
    def __init__(self, service: Service, config: Config):
        self.config = config
        self.http = config.http
        self.service = service
        self.registry = make_registry(service)
        self.control = ModelControl(service)
        self.routes = Routes(service, self.control, self.registry,
                             max_body_bytes=self.http.max_body_bytes,
                             request_timeout_s=self.http.request_timeout_s,
                             admin_token=self.http.token(), public=self.http.public)
        self.stall_timeout_s = config.server.stall_timeout_s
        self.inflight = 0
        self.connections: set[HttpConnection] = set()
        self.refusals = RefusalLog("http", "http.max_connections", self.http.max_connections)
        self.stopping = False
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._all_gone: asyncio.Event | None = None

    def make_app(self) -> web.Application:
        # client_max_size guards aiohttp's own readers; routes read bodies themselves.
        app = web.Application(client_max_size=self.http.max_body_bytes + 1,
                              middlewares=[self._middleware])
        self.routes.add_to(app)
        return app

    @property
    def draining(self) -> bool:
        """Stopping: from the moment the service drains, before ``stop`` has run."""
        return self.stopping or self.service.draining

    # -- connections ------------------------------------------------------------------------

    def connection_made(self, conn: HttpConnection) -> bool:
        """Count it; refuse the one over http.max_connections (False)."""
        self.connections.add(conn)
        if len(self.connections) <= self.http.max_connections:
            return True
        self.refusals.refused()
        conn.refuse(raw_error_response(503, (
            f"too many HTTP connections (http.max_connections = "
            f"{self.http.max_connections}); retry later")))
        return False

    def connection_lost(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        if self._all_gone is not None and not self.connections:
            self._all_gone.set()

    # -- requests ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        conn = request.protocol
        if isinstance(conn, HttpConnection):
            conn.request_started(request)
        if self.draining:  # began after the stop: not taken
            resp = outpost_error_response(Unavailable(
                "the server is shutting down; retry against its successor"))
        elif request.method != "POST":
            # Only POSTs (bodies, inference, model loads) count: health probes and
            # scrapes stay answerable under load.
            resp = await self._handle(request, handler)
        elif self.inflight >= self.http.max_inflight:
            resp = outpost_error_response(Unavailable(
                f"too many HTTP requests in flight (http.max_inflight = "
                f"{self.http.max_inflight}); retry shortly"))
        else:
            self.inflight += 1
            try:
                resp = await self._handle(request, handler)
            finally:
                self.inflight -= 1
        if self.draining:  # this answer is the connection's last
            resp.force_close()
        if isinstance(conn, HttpConnection):
            conn.answering = True
        return resp

    async def _handle(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except OutpostError as exc:
            return outpost_error_response(exc)
        except PayloadTooLarge as exc:
            return error_response(413, too_large_message(exc.args[0],
                                                         self.http.max_body_bytes), close=True)
        except web.HTTPException as exc:  # routing: 404, 405; answered with the v2 body
            if exc.status == 404:
                return outpost_error_response(not_found_route(request))
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return error_response(exc.status, f"{request.method} {request.path}: "
                                              f"{exc.reason}", headers=allow)
        except Exception as exc:
            if isinstance(exc, ConnectionError) and (
                    request.transport is None or request.transport.is_closing()):
                # The client went away, or was cut as stalled: no one to answer.
                return error_response(400, "the connection was closed", close=True)
            log.exception("http request failed", extra={"path": request.path})
            return error_response(500, INTERNAL_MESSAGE)  # a bug: answer it, keep serving

    # -- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        host, port = parse_host_port(self.http.address, "http.address")
        self._runner = web.AppRunner(self.make_app(), access_log=None,
                                     handle_signals=False, shutdown_timeout=_CLEANUP_S)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        try:
            self._listener = await loop.create_server(
                lambda: HttpConnection(self, manager, loop), host, port, backlog=1024,
                reuse_address=True)
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"http.address {self.http.address}: can't listen there: "
                              f"{exc.strerror or exc}; choose another address") from exc
        sockname = self._listener.sockets[0].getsockname()  # the port bound (port 0 works)
        self.address = (sockname[0], sockname[1])

    async def stop(self) -> None:
        """Stop accepting; close idle connections; let in-flight requests finish (each
        connection closes after its answer) until the drain timeout; abort the rest."""
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            if conn.idle():
                conn.force_close()
        if self.connections:
            self._all_gone = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_gone.wait(),
                                       self.config.server.drain_timeout_s)
            except TimeoutError:
                left = list(self.connections)
                log.warning("drain timed out: connections closed", extra={
                    "transport": "http", "connections": len(left),
                    "inflight": sum(c.request is not None for c in left)})
                answer = raw_error_response(503, (
                    f"the server stopped: server.drain_timeout_s = "
                    f"{self.config.server.drain_timeout_s:g} s passed first; retry "
                    f"against its successor"))
                for conn in left:
                    conn.give_up(answer)
                with contextlib.suppress(TimeoutError):  # the answers leave, for a reader
                    await asyncio.wait_for(self._all_gone.wait(), _LAST_WRITES_S)
                for conn in list(self.connections):
                    conn.abort()
        if self._runner is not None:
            await self._runner.cleanup()  # what is left of handlers whose peer is gone
            self._runner = None

    @property
    def url(self) -> str:
        host, port = self.address or ("", 0)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"
