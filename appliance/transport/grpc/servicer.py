"""The RPCs of ``inference.GRPCInferenceService``: each parses, calls the ``Service`` (or
``ModelControl``, or the shared memory registry), answers.

Errors are raised as ``OutpostError`` and answered by ``_answer`` as the gRPC status of
the same name with the error's message, so a handler reads as the happy path; anything
else is a bug: INTERNAL with a fixed message, the exception logged. Descriptions and
figures are the maps HTTP serves (triton_config.py), parsed into the messages, so the two
transports answer alike.
"""

from __future__ import annotations

import functools
import hmac
import logging

import grpc
from google.protobuf import json_format

from appliance import __version__
from appliance.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    OutpostError,
    PermissionDenied,
    Unauthenticated,
)
from appliance.serving.service import SERVER_NAME, Service
from appliance.transport.grpc import inference_pb2 as pb
from appliance.transport.grpc.errors import INTERNAL_MESSAGE, status_code
from appliance.transport.grpc.inference_pb2_grpc import GRPCInferenceServiceServicer
from appliance.transport.grpc.stream import InferStream
from appliance.transport.grpc.tensors import decode_request, encode_response, parse_version
from appliance.transport.http.control import ModelControl
from appliance.transport.http.triton_config import (
    EXTENSIONS,
    model_config,
    model_statistics,
    platform,
    tensor_metadata,
)

log = logging.getLogger("outpost.grpc")

CUDA_SHM_MESSAGE = ("CUDA shared memory is not served by outpost; use system shared memory "
                    "(SystemSharedMemoryRegister)")


def _rpc(*, counted: bool = False):
    """An RPC handler answered by ``Servicer._answer``; ``counted``: it sends work (an
    inference, a model load) and counts against grpc.max_inflight while it runs."""
    def wrap(method):
        @functools.wraps(method)
        async def handler(self: Servicer, request, context):
            return await self._answer(method, request, context, counted)
        return handler
    return wrap


class Servicer(GRPCInferenceServiceServicer):
    def __init__(self, service: Service, *, admin_token: str, public: bool,
                 max_message_bytes: int, max_inflight: int, stream_inflight: int):
        self.service = service
        self.control = ModelControl(service)
        self.shm = service.shared_memory
        self.counts = service.protocol_counts
        self.admin_token = admin_token
        self.public = public
        self.max_message_bytes = max_message_bytes
        self.max_inflight = max_inflight
        self.stream_inflight = stream_inflight
        self.inflight = 0
        self.streams: set[InferStream] = set()
        self.stopping = False  # streams that begin now end at once

    async def _answer(self, method, request, context, counted: bool):
        if counted:
            if self.inflight >= self.max_inflight:
                await context.abort(status_code("UNAVAILABLE"), (
                    f"too many gRPC calls in flight (grpc.max_inflight = "
                    f"{self.max_inflight}); retry shortly"))
            self.inflight += 1
        try:
            return await method(self, request, context)
        except OutpostError as exc:
            code, message = exc.code, exc.message
        except Exception:
            log.exception("grpc call failed", extra={"rpc": method.__name__})
            code, message = "INTERNAL", INTERNAL_MESSAGE
        finally:
            if counted:
                self.inflight -= 1
        await context.abort(status_code(code), message)

    # -- health and metadata ----------------------------------------------------------------

    @_rpc()
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.service.live())

    @_rpc()
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready())

    @_rpc()
    async def ModelReady(self, request, context):
        version = parse_version(request.version, "version")
        try:
            info = self.service.describe(_model(request.name), version)
        except NotFound:  # Triton: a model it doesn't know is not ready, not an error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=info.ready)

    @_rpc()
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=EXTENSIONS)

    @_rpc()
    async def ModelMetadata(self, request, context):
        info = self.describe(request)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=info.name,
            versions=[str(v) for v in self.service.served_versions(info.name)],
            platform=platform(info.engine_kind),
            inputs=[tensor(**tensor_metadata(s)) for s in info.inputs],
            outputs=[tensor(**tensor_metadata(s)) for s in info.outputs])

    @_rpc()
    async def ModelConfig(self, request, context):
        config = json_format.ParseDict(model_config(self.describe(request)), pb.ModelConfig(),
                                       ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=config)

    @_rpc()
    async def ModelStatistics(self, request, context):
        """Triton's statistics extension: one version, a model's, or every loaded one."""
        if request.name:
            versions = [self.describe(request)]
        elif request.version:
            raise InvalidArgument("'version' needs 'name': statistics of every model come "
                                  "with neither")
        else:
            versions = self.service.statistics()
        answer = pb.ModelStatisticsResponse()
        for info in versions:
            json_format.ParseDict(model_statistics(info), answer.model_stats.add(),
                                  ignore_unknown_fields=True)
        return answer

    def describe(self, request):
        """The request's model version (name, version), described without loading it."""
        return self.service.describe(_model(request.name),
                                     parse_version(request.version, "version"))

    # -- inference ---------------------------------------------------------------------------

    @_rpc(counted=True)
    async def ModelInfer(self, request, context):
        try:
            _model(request.model_name, "model_name")
            decoded = decode_request(request, self.shm, context.time_remaining())
            try:
                response = await self.service.infer_async(
                    decoded.infer, limit_s=context.time_remaining())
            except TimeoutError:
                raise DeadlineExceeded("no answer within the call's deadline; lower the "
                                       "load or give the call more time") from None
            answer = encode_response(response, decoded, self.shm, self.max_message_bytes)
        except OutpostError as exc:
            self.counts.answered("grpc", exc.code)
            raise
        except Exception:
            self.counts.answered("grpc", "INTERNAL")
            raise
        self.counts.answered("grpc")
        return answer

    @_rpc(counted=True)
    async def ModelStreamInfer(self, request_iterator, context):
        stream = InferStream(self, context, self.stream_inflight)
        if self.stopping:
            stream.finish()
        self.streams.add(stream)
        try:
            await stream.run(request_iterator)
        finally:
            self.streams.discard(stream)

    # -- model control (the repository extension) ------------------------------------------

    def require_admin(self, context) -> None:
        if not self.admin_token:
            if self.public:
                raise PermissionDenied(
                    "model control is off on a public address without an admin token; set "
                    "grpc.admin_token or grpc.admin_token_file")
            return
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value if isinstance(value, str) else ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.admin_token.encode()):
            raise Unauthenticated("model control needs the metadata 'authorization: Bearer "
                                  "<token>' with the server's grpc admin token")

    @_rpc(counted=True)
    async def RepositoryIndex(self, request, context):
        self.require_admin(context)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(**entry) for entry in self.control.index(request.ready)])

    @_rpc(counted=True)
    async def RepositoryModelLoad(self, request, context):
        self.require_admin(context)
        if request.parameters:
            raise InvalidArgument(
                f"load parameters ({', '.join(sorted(request.parameters))}) are not "
                f"supported: outpost loads the repository's active version; add versions "
                f"with 'outpost models add'")
        await self.control.load(_model(request.model_name, "model_name"))
        return pb.RepositoryModelLoadResponse()

    @_rpc(counted=True)
    async def RepositoryModelUnload(self, request, context):
        self.require_admin(context)  # unload_dependents and friends: nothing depends
        await self.control.unload(_model(request.model_name, "model_name"))
        return pb.RepositoryModelUnloadResponse()

    # -- shared memory ------------------------------------------------------------------------

    @_rpc()
    async def SystemSharedMemoryStatus(self, request, context):
        region = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(regions={
            r.name: region(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
            for r in self.shm.status(request.name)})

    @_rpc(counted=True)
    async def SystemSharedMemoryRegister(self, request, context):
        # A region maps a file of this host into the server: on a public address only an
        # admin may name one (else a remote client could read or overwrite any shared
        # memory object the server's user can open), as on HTTP.
        self.require_admin(context)
        self.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_rpc(counted=True)
    async def SystemSharedMemoryUnregister(self, request, context):
        self.require_admin(context)
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # CUDA shared memory is not served: no region can be registered, so there is none to
    # list or unregister. Those two answer as much (perf_analyzer unregisters every region,
    # CUDA ones too, before and after a run, and reports a failure).
    @_rpc()
    async def CudaSharedMemoryStatus(self, request, context):
        if request.name:
            raise NotFound(f"no CUDA shared memory region named '{request.name}': "
                           f"{CUDA_SHM_MESSAGE}")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request, context):
        # gRPC's own UNIMPLEMENTED, which no outpost error code stands for
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CUDA_SHM_MESSAGE)

    @_rpc()
    async def CudaSharedMemoryUnregister(self, request, context):
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- stopping ----------------------------------------------------------------------------

    def finish_streams(self) -> None:
        """The server stops: each stream answers what it has in flight and ends."""
        self.stopping = True
        for stream in list(self.streams):
            stream.finish()


def _model(name: str, key: str = "name") -> str:
    if not name:
        raise InvalidArgument(f"'{key}' must name a model")
    return name

