"""The v2 routes: each handler parses, calls the ``Service`` (or ``ModelControl``), answers.

Errors are raised as ``OutpostError`` and turned into the v2 error body by the server's
middleware, so a handler reads as the happy path.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from aiohttp import web

from appliance import __version__
from appliance.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OutpostError,
    PermissionDenied,
    Unauthenticated,
)
from appliance.serving.contract import NO_DEADLINE, InferRequest, VersionInfo
from appliance.serving.service import SERVER_NAME, Service
from appliance.transport.http.codec import (
    HEADER_LENGTH,
    InferBody,
    dumps_json,
    encode_infer_response,
    loads_json,
    parse_infer_body,
)
from appliance.transport.http.control import ModelControl
from appliance.transport.http.errors import error_response
from appliance.transport.http.metrics import render
from appliance.transport.http.triton_config import (
    EXTENSIONS,
    model_config,
    model_statistics,
    platform,
    tensor_metadata,
)

JSON = "application/json"
HTTP_OK = ("http", "OK")


class PayloadTooLarge(Exception):
    """The body is over http.max_body_bytes; answered 413 without reading the rest."""


def too_large_message(size: int, limit: int) -> str:
    return (f"the request body ({size} bytes or more) is over http.max_body_bytes = "
            f"{limit}; send smaller requests")


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(status=status, body=dumps_json(obj), content_type=JSON)


class Routes:
    def __init__(self, service: Service, control: ModelControl, registry, *,
                 max_body_bytes: int, request_timeout_s: float, admin_token: str,
                 public: bool):
        self.service = service
        self.control = control
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.admin_token = admin_token
        self.public = public
        self.shm = service.shared_memory
        self.counts = service.protocol_counts.counts

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_get("/v2/models/stats", self.statistics)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(base, self.model_metadata)
            r.add_get(base + "/ready", self.model_ready)
            r.add_get(base + "/config", self.config)
            r.add_get(base + "/stats", self.statistics)
            r.add_post(base + "/infer", self.infer, expect_handler=self.expect)
        r.add_post("/v2/repository/index", self.repository_index, expect_handler=self.expect)
        r.add_post("/v2/repository/models/{model}/load", self.load,
                   expect_handler=self.expect)
        r.add_post("/v2/repository/models/{model}/unload", self.unload,
                   expect_handler=self.expect)
        # Outpost's own extension: the hot swap and traffic policies of the socket's
        # admin ops, under the same admin token.
        r.add_post("/v2/repository/models/{model}/activate", self.activate,
                   expect_handler=self.expect)
        r.add_get("/v2/repository/models/{model}/traffic", self.traffic)
        r.add_post("/v2/repository/models/{model}/traffic", self.traffic,
                   expect_handler=self.expect)
        # The app's word on a pending OTA activation (the socket's update_activation)
        r.add_get("/v2/update/activation", self.update_activation)
        r.add_post("/v2/update/activation", self.update_activation,
                   expect_handler=self.expect)
        # Triton's system shared memory extension (regions shared with every transport)
        shm = "/v2/systemsharedmemory"
        r.add_get(shm + "/status", self.shm_status)
        r.add_get(shm + "/region/{region}/status", self.shm_status)
        r.add_post(shm + "/region/{region}/register", self.shm_register,
                   expect_handler=self.expect)
        r.add_post(shm + "/unregister", self.shm_unregister, expect_handler=self.expect)
        r.add_post(shm + "/region/{region}/unregister", self.shm_unregister,
                   expect_handler=self.expect)
        # CUDA shared memory is not served: none is ever registered, so status lists none
        # and unregister has nothing to do (perf_analyzer unregisters every run); only a
        # registration is refused.
        cuda = "/v2/cudasharedmemory"
        r.add_get(cuda + "/status", self.cuda_shm_none)
        r.add_get(cuda + "/region/{region}/status", self.cuda_shm_none)
        r.add_post(cuda + "/unregister", self.cuda_shm_none)
        r.add_post(cuda + "/region/{region}/unregister", self.cuda_shm_none)
        r.add_post(cuda + "/region/{region}/register", self.cuda_shm)
        r.add_get("/metrics", self.metrics)

    # -- lookups ---------------------------------------------------------------------------

    @staticmethod
    def url_version(request: web.Request) -> int | None:
        text = request.match_info.get("version")
        if not text:  # Triton treats an empty version as "the one the server picks"
            return None
        if not text.isdigit() or int(text) < 1:
            raise InvalidArgument(f"version {text!r} in the URL must be a positive integer")
        return int(text)

    def describe(self, request: web.Request) -> VersionInfo:
        """The URL's model version, described without loading it."""
        return self.service.describe(request.match_info["model"], self.url_version(request))

    # -- health and metadata ----------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response({"name": SERVER_NAME, "version": __version__,
                              "extensions": EXTENSIONS})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        # The spec: 200 is true, a 4xx is false.
        return web.Response(status=200 if self.service.ready() else 400)

    async def model_ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.describe(request).ready else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        info = self.describe(request)
        return json_response({
            "name": info.name,
            "versions": [str(v) for v in self.service.served_versions(info.name)],
            "platform": platform(info.engine_kind),
            "inputs": [tensor_metadata(s) for s in info.inputs],
            "outputs": [tensor_metadata(s) for s in info.outputs],
        })

    async def config(self, request: web.Request) -> web.Response:
        return json_response(model_config(self.describe(request)))

    async def statistics(self, request: web.Request) -> web.Response:
        """Triton's statistics extension, from the figures the `stats` op reports."""
        if "model" in request.match_info:
            versions = [self.describe(request)]
        else:
            versions = self.service.statistics()
        return json_response({"model_stats": [model_statistics(v) for v in versions]})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = render(self.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    # -- infer ------------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        model, version = request.match_info["model"], self.url_version(request)
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.request_timeout_s  # body read + queue + run
        try:
            async with asyncio.timeout_at(ends):
                raw = await self.read_body(request)
            body, wire_error = None, None
            try:
                body = parse_infer_body(raw, request.headers.get(HEADER_LENGTH), self.shm)
            except OutpostError as exc:  # raised after the model lookup: NOT_FOUND first
                wire_error = exc.with_traceback(None)  # no cycle through this frame
            infer = infer_request(model, version, body, wire_error)
            wire_error = None  # the request holds it, until the service raises it
            response = await self.service.infer_async(
                infer, limit_s=max(0.0, ends - loop.time()))
            chunks, header_len = encode_infer_response(
                response.model, response.version, body, response.outputs, self.shm)
        except TimeoutError:
            self.counts[("http", "DEADLINE_EXCEEDED")] += 1
            raise DeadlineExceeded(
                f"no answer within http.request_timeout_s = {self.request_timeout_s:g} s; "
                f"lower the load or raise the timeout") from None
        except OutpostError as exc:
            self.counts[("http", exc.code)] += 1
            raise
        self.counts[HTTP_OK] += 1
        if header_len is None:
            return web.Response(body=chunks[0], content_type=JSON)
        resp = web.Response(body=b"".join(chunks), content_type="application/octet-stream")
        resp.headers[HEADER_LENGTH] = str(header_len)
        return resp

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversize body before the client sends it."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(417, "only 'Expect: 100-continue' is understood",
                                  close=True)
        size = request.content_length
        if size is not None and size > self.max_body_bytes:
            return error_response(413, too_large_message(size, self.max_body_bytes),
                                  close=True)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.max_body_bytes
        if request.content_length is not None:
            if request.content_length > limit:
                raise PayloadTooLarge(request.content_length)
            return await request.read()  # at most Content-Length bytes
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(size)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- model control (Triton's model repository extension) -------------------------------

    def require_admin(self, request: web.Request) -> None:
        if not self.admin_token:
            if self.public:
                raise PermissionDenied(
                    "model control is off on a public address without an admin token; set "
                    "http.admin_token or http.admin_token_file")
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.admin_token.encode()):
            raise Unauthenticated("model control needs 'Authorization: Bearer <token>' with "
                                  "the server's http admin token")

    async def control_body(self, request: web.Request) -> dict:
        raw = await self.read_body(request)
        if not raw.strip():
            return {}
        body = loads_json(raw)
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return body

    async def repository_index(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self.control_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        return json_response(self.control.index(ready))

    async def load(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        body = await self.control_body(request)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidArgument("'parameters' must be a JSON object")
        if params:
            raise InvalidArgument(
                f"load parameters ({', '.join(sorted(params))}) are not supported: outpost "
                f"loads the repository's active version; add versions with "
                f"'outpost models add'")
        await self.control.load(request.match_info["model"])
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        await self.control_body(request)  # unload_dependents and friends: nothing depends
        await self.control.unload(request.match_info["model"])
        return web.Response(status=200)


    # -- system shared memory -----------------------------------------------------------------

    async def shm_status(self, request: web.Request) -> web.Response:
        return json_response([
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in self.shm.status(request.match_info.get("region", ""))])

    async def shm_register(self, request: web.Request) -> web.Response:
        # A region maps a file of this host into the server: on a public address only an
        # admin may name one (else a remote client could read or overwrite any shared
        # memory object the server's user can open).
        self.require_admin(request)
        body = await self.control_body(request)
        unknown = set(body) - {"key", "offset", "byte_size"}
        if unknown:
            raise InvalidArgument(f"unknown field '{sorted(unknown)[0]}'; send key, offset "
                                  f"and byte_size")
        self.shm.register(request.match_info["region"], body.get("key"),
                          body.get("offset", 0), body.get("byte_size"))
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        self.require_admin(request)
        await self.control_body(request)
        self.shm.unregister(request.match_info.get("region", ""))
        return web.Response(status=200)

    async def cuda_shm(self, request: web.Request) -> web.Response:
        raise InvalidArgument("CUDA shared memory is not served by outpost; use system "
                              "shared memory (/v2/systemsharedmemory)")

    async def cuda_shm_none(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            if "region" in request.match_info:
                raise NotFound(f"no CUDA shared memory region named "
                               f"'{request.match_info['region']}': CUDA shared memory is not "
                               f"served by outpost")
            return json_response([])
        return web.Response(status=200)

    async def activate(self, request: web.Request) -> web.Response:
        """Body {"version": N}: hot swap to that version (it loads and warms first)."""
        self.require_admin(request)
        body = await self.control_body(request)
        result = await self.service.activate(request.match_info["model"], body.get("version"))
        return json_response(result)

    async def traffic(self, request: web.Request) -> web.Response:
        """GET: the policy in force. POST {"policy": {...}} sets one, {"clear": true}
        removes the run-time one."""
        self.require_admin(request)
        model = request.match_info["model"]
        change = None
        if request.method == "POST":
            change = await self.control_body(request)
            unknown = set(change) - {"policy", "clear"}
            if unknown:
                raise InvalidArgument(f"unknown field '{sorted(unknown)[0]}'; send "
                                      f"{{\"policy\": {{...}}}} or {{\"clear\": true}}")
        return json_response({"model": model,
                              "traffic": await self.service.traffic(model, change)})

    async def update_activation(self, request: web.Request) -> web.Response:
        """GET: the pending updates' activation state. POST {"action": "allow" |
        "defer", "for_s": N, "model": M}: the app's word (docs/ota.md)."""
        self.require_admin(request)
        fields = await self.control_body(request) if request.method == "POST" else {}
        if request.method == "POST" and "action" not in fields:
            raise InvalidArgument('send {"action": "allow"} or {"action": "defer"} (with '
                                  '"for_s" seconds); GET reads the state')
        return json_response(await self.service.update_activation(fields))


def infer_request(model: str, version: int | None, body: InferBody | None,
                  wire_error: OutpostError | None) -> InferRequest:
    """The service's request for a parsed v2 body (None: it could not be parsed, and
    ``wire_error`` says why); ``parameters.timeout`` (microseconds) becomes a deadline."""
    request = InferRequest(model, {}, version, wire_error=wire_error)
    if body is None:
        return request
    request.inputs = body.inputs
    request.outputs = body.outputs
    params = body.parameters
    request.priority = params.get("priority")
    request.routing_key = params.get("routing_key")
    timeout_us = params.get("timeout")
    if timeout_us is not None:
        if type(timeout_us) is not int or timeout_us < 0:
            request.wire_error = InvalidArgument(
                "parameters.timeout must be a non-negative integer of microseconds")
        else:
            request.deadline = (time.monotonic() + timeout_us / 1e6 if timeout_us
                                else NO_DEADLINE)
    return request


def not_found_route(request: web.Request) -> OutpostError:
    return NotFound(f"no route {request.method} {request.path}; see docs/http.md for the "
                    f"v2 routes outpost serves")
