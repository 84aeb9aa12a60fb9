"""The clients' sans-IO core, with no socket at all: request frames, response bytes fed
in pieces, results and typed errors, and the ops written once for both clients."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from appliance import errors
from appliance.client.core import Codec, InferResult, Ops, infer_result, result
from appliance.protocol.frames import HEADER, encode_frame
from appliance.protocol.tensors import encode_tensor


class Recording(Ops):
    """Ops over a Codec whose frames are kept, not sent; each op answers ``answer``."""

    def __init__(self, answer: dict | None = None):
        self.codec = Codec()
        self.sent: list[tuple[int, list]] = []
        self.answer = answer or {"ok": True}

    def _send(self, op, fields, parse):
        self.sent.append(self.codec.request(op, fields))
        return result(self.answer, parse)


def _wire_tensor(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": array.tobytes()}


def _frame_of(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize("shape", [(1, 16), (1, 3, 224, 224)], ids=["small", "600KiB"])
def test_an_infer_request_is_the_frame_encode_frame_makes(shape):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    ops = Recording({"ok": True, "model": "identity", "version": 2, "outputs": {}})
    ops.infer("identity", {"x": x}, version=2, timeout_ms=50)
    [(rid, parts)] = ops.sent
    assert rid == 1
    expected = encode_frame({"model": "identity", "inputs": {"x": _wire_tensor(x)},
                             "version": 2, "timeout_ms": 50, "op": "infer", "id": 1})
    assert _frame_of(parts) == expected
    if x.nbytes < 1 << 16:
        assert len(parts) == 1
    else:  # the array's bytes are a part of their own: written from the array, not copied
        assert any(isinstance(p, memoryview) and np.shares_memory(np.asarray(p), x)
                   for p in parts)


def test_request_ids_count_up_and_the_callers_map_is_the_request():
    codec = Codec()
    fields = {"model": "m"}
    rid, parts = codec.request("metadata", fields)
    assert (rid, fields) == (1, {"model": "m", "op": "metadata", "id": 1})
    assert parts == [encode_frame(fields)]
    assert codec.request("health", {})[0] == 2


@pytest.mark.parametrize("call, op, fields", [
    (lambda c: c.hello(), "hello", {"v": 1}),
    (lambda c: c.hello("s3cret"), "hello", {"v": 1, "token": "s3cret"}),
    (lambda c: c.models(), "models", {}),
    (lambda c: c.metadata("cnn"), "metadata", {"model": "cnn"}),
    (lambda c: c.metadata("cnn", 3), "metadata", {"model": "cnn", "version": 3}),
    (lambda c: c.health(), "health", {}),
    (lambda c: c.stats(), "stats", {}),
    (lambda c: c.stats("cnn"), "stats", {"model": "cnn"}),
    (lambda c: c.call("load", model="cnn", version=2), "load", {"model": "cnn", "version": 2}),
    (lambda c: c.infer("m", {}, outputs=("y",), priority=1), "infer",
     {"model": "m", "inputs": {}, "outputs": ["y"], "priority": 1}),
])
def test_each_op_sends_its_fields(call, op, fields):
    ops = Recording({"ok": True, "models": [], "model": "m", "version": 1, "outputs": {}})
    call(ops)
    [(_, parts)] = ops.sent
    sent = msgpack.unpackb(_frame_of(parts)[4:])
    assert sent == {**fields, "op": op, "id": 1}


def test_models_answers_the_list_and_call_the_whole_map():
    answer = {"id": 1, "ok": True, "models": [{"name": "cnn"}]}
    assert Recording(answer).models() == [{"name": "cnn"}]
    assert Recording(answer).call("models") is answer


def test_inputs_that_are_not_a_dict_are_refused_before_anything_is_sent():
    ops = Recording()
    with pytest.raises(errors.InvalidArgument, match="inputs must be a dict"):
        ops.infer("m", [np.zeros(3, np.float32)])
    with pytest.raises(errors.InvalidArgument, match="can't be sent"):
        ops.infer("m", {"x": np.zeros(3, np.complex64)})
    assert ops.sent == []


def test_the_same_ops_are_awaitable_over_a_coroutine_send():
    class Awaiting(Recording):
        async def _send(self, op, fields, parse):
            await asyncio.sleep(0)
            return Recording._send(self, op, fields, parse)

    ops = Awaiting({"ok": True, "models": ["a"]})

    async def go():
        return await ops.models(), await ops.health()

    assert asyncio.run(go()) == (["a"], {"ok": True, "models": ["a"]})
    assert [rid for rid, _ in ops.sent] == [1, 2]


def _infer_response(rid, y: np.ndarray) -> bytes:
    return encode_frame({"id": rid, "ok": True, "model": "identity", "version": 1,
                         "outputs": {"y": encode_tensor(y)}})


@pytest.mark.parametrize("n", [16, 40_000], ids=["small", "160KiB"])
def test_a_response_split_anywhere_is_put_back_together(n):
    y = np.linspace(-1, 1, n, dtype=np.float32).reshape(1, n)
    frame = _infer_response(5, y)
    # every byte boundary of a small frame; of a large one, the header and map's head
    # byte by byte, then a spread of cuts through the data
    cuts = range(len(frame) + 1) if n < 1000 else [*range(200), *range(200, len(frame), 997),
                                                   len(frame) - 1, len(frame)]
    for cut in cuts:
        codec = Codec()
        codec.feed(frame[:cut])
        if cut < len(frame):
            assert codec.next_response() is None, cut
        codec.feed(frame[cut:])
        r = result(codec.next_response(), infer_result)
        assert isinstance(r, InferResult) and (r.model, r.version) == ("identity", 1)
        assert r["y"].dtype == np.float32 and np.array_equal(r["y"], y), cut
        assert not r["y"].flags.writeable
        assert codec.next_response() is None


def test_responses_fed_a_byte_at_a_time_come_out_in_order():
    stream = _infer_response(1, np.ones((1, 4), np.float32)) + encode_frame(
        {"id": 2, "ok": True, "live": True, "ready": True})
    codec = Codec()
    got = []
    for i in range(len(stream)):
        codec.feed(stream[i:i + 1])
        while (r := codec.next_response()) is not None:
            got.append(r["id"])
    assert got == [1, 2]


@pytest.mark.parametrize("code", errors.CODES)
def test_an_error_response_raises_the_exception_of_its_code(code):
    codec = Codec()
    codec.feed(encode_frame({"id": 8, "ok": False,
                             "error": {"code": code, "message": "model 'ad' is not served"}}))
    with pytest.raises(errors.OutpostError) as e:
        result(codec.next_response(), infer_result)
    assert e.value.code == code and type(e.value).code == code
    assert e.value.message == "model 'ad' is not served"


def test_a_malformed_error_is_internal():
    with pytest.raises(errors.Internal, match="malformed error"):
        result({"id": 1, "ok": False, "error": "nope"}, None)


def test_a_response_with_id_nil_is_handed_out_and_raises_its_error():
    """The server refusing the stream (a broken frame of ours, a missing token) answers
    with id nil: the core hands it out like any response, and its error is raised."""
    codec = Codec()
    codec.feed(encode_frame({"id": None, "ok": False, "error": {
        "code": "UNAUTHENTICATED", "message": "send hello with the token first"}}))
    response = codec.next_response()
    assert response["id"] is None
    with pytest.raises(errors.Unauthenticated, match="hello with the token"):
        result(response, None)


def test_a_frame_length_of_zero_is_a_broken_frame():
    codec = Codec()
    with pytest.raises(errors.Unavailable, match="the server sent a broken frame: frame "
                                                 "length is 0"):
        codec.feed(HEADER.pack(0) + b"\x80")


def test_a_frame_that_is_not_a_map_is_broken_after_the_frames_before_it():
    body = msgpack.packb([1, 2])
    codec = Codec()
    codec.feed(encode_frame({"id": 1, "ok": True}) + HEADER.pack(len(body)) + body)
    assert codec.next_response() == {"id": 1, "ok": True}
    with pytest.raises(errors.Unavailable, match="broken frame: frame holds a msgpack list"):
        codec.next_response()
