"""The gRPC listener: grpcio's asyncio server on the socket server's event loop.

Limits, and what holds a client that misbehaves:

- A message (request or response) over ``grpc.max_message_bytes`` is refused by gRPC
  before it is read whole (RESOURCE_EXHAUSTED); a response over it is refused by the
  servicer before it is built.
- ``grpc.max_inflight``: inference and control calls running at once (a stream counts as
  one); past it a call is answered UNAVAILABLE. gRPC's own limit on every call (probes and
  metadata included) sits a little above it, and each connection may open that many
  HTTP/2 streams; a client past those waits for a stream or is refused by gRPC.
- The requests of one stream read and not yet written back:
  ``server.max_inflight_per_connection``; past it the stream is not read (HTTP/2 flow
  control holds the client back).
- A client gone without a word is found by HTTP/2 keepalive pings (KEEPALIVE_TIME_MS,
  then KEEPALIVE_TIMEOUT_MS), and its calls are cancelled; a connection with no call for
  IDLE_CONNECTION_MS is closed. A client that stalls in the middle of a message holds
  its call (and at most ``grpc.max_message_bytes`` of buffer) until the call's deadline, or
  until its connection dies: gRPC has no clock of its own for a message that stops
  arriving, so set deadlines on clients beyond this machine.

``stop`` stops accepting calls (new ones: UNAVAILABLE), ends each stream once it has
answered what it has in flight, lets the other calls finish, and cancels what is left at
``server.drain_timeout_s``.
"""

from __future__ import annotations

import logging

import grpc

from appliance.config.schema import Config
from appliance.errors import ConfigError
from appliance.paths import parse_host_port
from appliance.serving.service import Service
from appliance.transport.grpc.inference_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from appliance.transport.grpc.servicer import Servicer

log = logging.getLogger("outpost.grpc")

KEEPALIVE_TIME_MS = 60_000  # ping a connection quiet this long ...
KEEPALIVE_TIMEOUT_MS = 20_000  # ... and close it when the ping is not answered in this
IDLE_CONNECTION_MS = 15 * 60_000  # a connection without calls this long is closed
CLIENT_PING_MIN_MS = 10_000  # clients may ping this often (tritonclient's keepalive)
PROBE_HEADROOM = 64  # gRPC's own call limit: grpc.max_inflight plus this, for probes


class GrpcServer:
    def __init__(self, service: Service, config: Config):
        self.config = config
        self.grpc = config.grpc
        self.service = service
        self.servicer = Servicer(
            service, admin_token=self.grpc.token(), public=self.grpc.public,
            max_message_bytes=self.grpc.max_message_bytes,
            max_inflight=self.grpc.max_inflight,
            stream_inflight=config.server.max_inflight_per_connection)
        self.address: tuple[str, int] | None = None
        self._server: grpc.aio.Server | None = None

    def options(self) -> list[tuple[str, int]]:
        limit = self.grpc.max_message_bytes
        return [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_concurrent_streams", self.grpc.max_inflight + PROBE_HEADROOM),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", CLIENT_PING_MIN_MS),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
            # One server per port: by default gRPC shares it (SO_REUSEPORT), and a second
            # outpost would take half the connections of the first instead of failing.
            ("grpc.so_reuseport", 0),
        ]

    async def start(self) -> None:
        host, port = parse_host_port(self.grpc.address, "grpc.address")
        server = grpc.aio.server(
            options=self.options(),
            maximum_concurrent_rpcs=self.grpc.max_inflight + PROBE_HEADROOM)
        add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(target)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"grpc.address {self.grpc.address}: can't listen there (in use, "
                              f"or not an address of this machine); choose another address")
        await server.start()
        self._server = server
        self.address = (host, bound)  # the port bound (port 0 works)

    async def stop(self) -> None:
        """Stop accepting; end the streams once they have answered; let the other calls
        finish until the drain timeout; cancel the rest."""
        if self._server is None:
            return
        self.servicer.finish_streams()
        await self._server.stop(self.config.server.drain_timeout_s)
        self._server = None

    @property
    def target(self) -> str:
        """HOST:PORT as a gRPC client dials it."""
        host, port = self.address or ("", 0)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
