"""The HTTP listener: an aiohttp app on the socket server's event loop.

Limits live here, answered before any work: past ``max_inflight`` concurrent POSTs a
503; a body over ``max_body_bytes`` a 413 without reading it; ``request_timeout_s`` bounds
each infer (routes.py). ``stop`` stops accepting, lets in-flight requests finish (up to
the drain timeout), then closes idle keep-alive connections.
"""

from __future__ import annotations

import logging

from aiohttp import web

from appliance.config.schema import Config
from appliance.errors import ConfigError, OutpostError, Unavailable
from appliance.paths import parse_host_port
from appliance.serving.service import Service
from appliance.transport.http.control import ModelControl
from appliance.transport.http.errors import error_response, outpost_error_response
from appliance.transport.http.metrics import make_registry
from appliance.transport.http.routes import (
    PayloadTooLarge,
    Routes,
    not_found_route,
    too_large_message,
)

log = logging.getLogger("outpost.http")


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
        self.inflight = 0
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        # client_max_size guards aiohttp's own readers; routes read bodies themselves.
        app = web.Application(client_max_size=self.http.max_body_bytes + 1,
                              middlewares=[self._middleware])
        self.routes.add_to(app)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        # Only POSTs (bodies, inference, model loads) count: health probes and scrapes
        # stay answerable under load.
        if request.method != "POST":
            return await self._handle(request, handler)
        if self.inflight >= self.http.max_inflight:
            return outpost_error_response(Unavailable(
                f"too many HTTP requests in flight (http.max_inflight = "
                f"{self.http.max_inflight}); retry shortly"))
        self.inflight += 1
        try:
            return await self._handle(request, handler)
        finally:
            self.inflight -= 1

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
        except Exception as exc:  # a bug: answer it, keep serving
            log.exception("http request failed", extra={"path": request.path})
            return error_response(500, f"internal error: {exc}")

    async def start(self) -> None:
        host, port = parse_host_port(self.http.address, "http.address")
        self._runner = web.AppRunner(self.make_app(), access_log=None,
                                     handle_signals=False,
                                     shutdown_timeout=self.config.server.drain_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"http.address {self.http.address}: can't listen there: "
                              f"{exc.strerror or exc}; choose another address") from exc
        sockname = self._runner.addresses[0]  # the port actually bound (port 0 works)
        self.address = (sockname[0], sockname[1])

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests (drain timeout), close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host, port = self.address or ("", 0)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"
