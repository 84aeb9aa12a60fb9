"""One ModelStreamInfer call: requests read as they come and queued at once, each answered
on the stream as it completes (in any order, as Triton does), an error in its answer's
``error_message`` while the stream goes on.

A streaming client pipelines, so the requests of one stream are in flight together, up to
``server.max_inflight_per_connection`` read and not yet written back; past that the stream
is not read until an answer is written (HTTP/2 flow control holds the client back, and a
client that reads no answers stops being read: nothing piles up in the server). A client
that goes away (its call cancelled, its connection lost) cancels what it still has queued:
nothing of it is kept. When the server stops, a stream stops reading, answers what it has
in flight and ends.
"""

from __future__ import annotations

import asyncio
import logging

from appliance.errors import InvalidArgument, OutpostError
from appliance.scheduling.request import QueuedRequest
from appliance.serving.contract import InferResponse
from appliance.transport.grpc import inference_pb2 as pb
from appliance.transport.grpc.errors import INTERNAL_MESSAGE
from appliance.transport.grpc.tensors import DecodedRequest, decode_request, encode_response

log = logging.getLogger("outpost.grpc")

_END = None  # on the answer queue: the stream is done


class StreamRequest:
    """One request of a stream until it is answered: the service's reply callback."""

    __slots__ = ("stream", "decoded", "queued")

    def __init__(self, stream: InferStream, decoded: DecodedRequest):
        self.stream = stream
        self.decoded: DecodedRequest | None = decoded
        self.queued: QueuedRequest | None = None

    def reply(self, response: InferResponse | None, error: OutpostError | None) -> None:
        decoded, queued = self.decoded, self.queued
        # Answered: the request and its arrays go, and the cycle through the queued
        # request's callback with them.
        self.decoded = self.queued = None
        self.stream.answered(queued, decoded, response, error)


class InferStream:
    def __init__(self, servicer, context, max_inflight: int):
        self.servicer = servicer
        self.context = context
        self.pending: set[QueuedRequest] = set()  # queued in the service, to cancel
        self.inflight = 0  # read and not yet answered
        # read and not yet written back: a slot is taken before a request is read
        self.slots = asyncio.Semaphore(max_inflight)
        self.answers: asyncio.Queue = asyncio.Queue()
        self.reading = True
        self.closed = False
        self.reader: asyncio.Task | None = None

    async def run(self, requests) -> None:
        """Answer the stream until the client is done sending and every request is
        answered; on the way out (also when cancelled) drop what is still queued."""
        if self.reading:
            self.reader = asyncio.create_task(self._read(requests))
        else:  # finished before it began: the server stops
            self._end_when_answered()
        try:
            while (answer := await self.answers.get()) is not _END:
                await self.context.write(answer)  # waits while the client reads nothing
                self.slots.release()  # written: the stream may take one more request
        finally:
            self.closed = True
            if self.reader is not None:
                self.reader.cancel()
            for queued in self.pending:
                self.servicer.service.cancel(queued)
            self.pending.clear()
            self.answers = asyncio.Queue()  # what was left unwritten goes now

    def finish(self) -> None:
        """The server stops: read no more; answer what is in flight, then end."""
        if self.reader is not None:
            self.reader.cancel()
        else:
            self.reading = False

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, requests) -> None:
        try:
            async for msg in requests:
                await self.slots.acquire()
                self._submit(msg)
        except asyncio.CancelledError:
            pass  # finishing (the server stops), or the call is over
        except Exception as exc:  # noqa: BLE001 - the call broke: nothing more to read
            log.debug("grpc stream read ended", extra={"error": type(exc).__name__})
        finally:
            self.reading = False
            self._end_when_answered()

    def _submit(self, msg: pb.ModelInferRequest) -> None:
        servicer = self.servicer
        self.inflight += 1
        try:
            if not msg.model_name:
                raise InvalidArgument("model_name must name a model")
            decoded = decode_request(msg, servicer.shm, self.context.time_remaining())
            request = StreamRequest(self, decoded)
            queued = servicer.service.infer(decoded.infer, request.reply)
        except OutpostError as exc:
            self.answered(None, None, None, exc.with_traceback(None), msg)
            return
        except Exception:
            log.exception("grpc stream request failed")
            self.answered(None, None, None, None, msg)
            return
        if request.decoded is not None:  # not answered already (inside ``infer``)
            request.queued = queued
            self.pending.add(queued)

    # -- answering ---------------------------------------------------------------------------

    def answered(self, queued: QueuedRequest | None, decoded: DecodedRequest | None,
                 response: InferResponse | None, error: OutpostError | None,
                 msg: pb.ModelInferRequest | None = None) -> None:
        """A request's answer (``error`` and ``response`` both None: a bug's), queued
        for writing; on the event loop."""
        if self.closed:
            return
        if queued is not None:
            self.pending.discard(queued)
        self.inflight -= 1
        servicer = self.servicer
        answer = None
        if response is not None:
            try:
                answer = pb.ModelStreamInferResponse(infer_response=encode_response(
                    response, decoded, servicer.shm, servicer.max_message_bytes))
                code = "OK"
            except OutpostError as exc:
                error = exc
            except Exception:
                log.exception("grpc stream answer failed")
        if answer is None:
            code, message = ((error.code, error.message) if error is not None
                             else ("INTERNAL", INTERNAL_MESSAGE))
            answer = pb.ModelStreamInferResponse(error_message=message)
            # Which request failed, for a client that reads the stream itself
            source = msg if msg is not None else decoded
            if source is not None:
                answer.infer_response.id = source.id
            if msg is not None:
                answer.infer_response.model_name = msg.model_name
            elif decoded is not None:
                answer.infer_response.model_name = decoded.infer.model
        servicer.counts.answered("grpc", code)
        self.answers.put_nowait(answer)
        self._end_when_answered()

    def _end_when_answered(self) -> None:
        if not self.reading and self.inflight == 0 and not self.closed:
            self.answers.put_nowait(_END)
