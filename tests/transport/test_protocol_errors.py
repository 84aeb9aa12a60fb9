"""Every kind of bad input, over a real socket against the real server process.

Each gets the right code (broken framing: one error with id nil, then a close), and the
server keeps serving other clients.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from tests.support.wire import call, connect, frame, is_closed, recv, tensor

X = np.ones((1, 16), np.float32)


def ok_infer(path) -> None:
    """Another client is still served correctly."""
    with connect(path) as s:
        r = call(s, op="infer", id=1, model="identity", inputs={"x": tensor(X)})
    assert r["ok"], r
    assert np.frombuffer(r["outputs"]["y"]["data"], np.float32).tolist() == X[0].tolist()


def assert_fatal(s, code="INVALID_ARGUMENT", words=()) -> dict:
    r = recv(s)
    assert r["id"] is None and r["ok"] is False
    assert r["error"]["code"] == code
    for w in words:
        assert w in r["error"]["message"]
    assert is_closed(s)
    return r


def test_frame_over_limit_is_refused_unread(module_server):
    with connect(module_server.socket_path) as s:
        # Only the header: the server must answer without waiting for the 100 MiB body.
        s.sendall(struct.pack(">I", 100 << 20))
        assert_fatal(s, words=("limit",))
    ok_infer(module_server.socket_path)


def test_zero_length_frame(module_server):
    with connect(module_server.socket_path) as s:
        s.sendall(struct.pack(">I", 0))
        assert_fatal(s, words=("length is 0",))
    ok_infer(module_server.socket_path)


def test_truncated_frame_then_close(module_server):
    with connect(module_server.socket_path) as s:
        body = msgpack.packb({"op": "health", "id": 1})
        s.sendall(struct.pack(">I", len(body) + 50) + body)  # promises more than it sends
    ok_infer(module_server.socket_path)
    with connect(module_server.socket_path) as s:
        assert call(s, op="health", id=2)["ok"]


@pytest.mark.parametrize("body", [
    msgpack.packb([1, 2, 3]),          # an array, not a map
    msgpack.packb("hello"),            # a string
    b"\xc1",                           # a byte msgpack never uses
    msgpack.packb({"op": "health", "id": 1}) + msgpack.packb(1),  # two objects in a frame
])
def test_not_exactly_one_map(module_server, body):
    with connect(module_server.socket_path) as s:
        s.sendall(frame(body))
        assert_fatal(s)
    ok_infer(module_server.socket_path)


@pytest.mark.parametrize("bad", [frame(b"\xc1"), struct.pack(">I", 0)])
@pytest.mark.parametrize("slow", [False, True], ids=["identity", "cnn-on-a-worker"])
def test_good_frames_before_a_broken_one_are_answered_first(module_server, bad, slow):
    """One write: requests, then a frame that breaks the stream. Every answer comes back,
    then the one error with id nil, then the close. The CNN runs on a worker thread, so
    its answer comes after the broken frame has been read; it must still be sent."""
    image = {"image": tensor(np.ones((1, 3, 224, 224), np.float32))}
    with connect(module_server.socket_path) as s:
        s.sendall(frame({"op": "infer", "id": 7, "model": "identity",
                         "inputs": {"x": tensor(X)}})
                  + (frame({"op": "infer", "id": 9, "model": "cnn", "inputs": image})
                     if slow else b"")
                  + frame({"op": "health", "id": 8}) + bad)
        want = {7, 8, 9} if slow else {7, 8}
        answers = [recv(s) for _ in want]
        assert {a["id"] for a in answers} == want and all(a["ok"] for a in answers), answers
        assert_fatal(s)
    ok_infer(module_server.socket_path)


def test_unknown_op_keeps_connection(module_server):
    with connect(module_server.socket_path) as s:
        r = call(s, op="explode", id=7)
        assert r["id"] == 7 and not r["ok"]
        assert r["error"]["code"] == "INVALID_ARGUMENT" and "explode" in r["error"]["message"]
        assert call(s, op="health", id=8)["ok"]


@pytest.mark.parametrize("bad_id", [None, "7", -1, 1.5, True])
def test_missing_or_non_integer_id(module_server, bad_id):
    with connect(module_server.socket_path) as s:
        msg = {"op": "health"} if bad_id is None else {"op": "health", "id": bad_id}
        r = call(s, **msg)
        assert r["id"] is None and r["error"]["code"] == "INVALID_ARGUMENT"
        assert "id" in r["error"]["message"]
        assert call(s, op="health", id=9)["ok"]  # still open


def test_unknown_model_and_version_are_not_found_before_inputs(module_server):
    with connect(module_server.socket_path) as s:
        # Inputs are garbage: NOT_FOUND must come before they are looked at.
        r = call(s, op="infer", id=1, model="nope", inputs="garbage")
        assert r["error"]["code"] == "NOT_FOUND" and "nope" in r["error"]["message"]
        r = call(s, op="infer", id=2, model="identity", version=99, inputs="garbage")
        assert r["error"]["code"] == "NOT_FOUND" and "99" in r["error"]["message"]
        r = call(s, op="metadata", id=3, model="nope")
        assert r["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize("inputs,words", [
    ({"x": tensor(X.astype(np.float64))}, ("float64", "float32")),
    ({"x": tensor(np.ones((16,), np.float32))}, ("shape",)),
    ({"x": tensor(np.ones((1, 15), np.float32))}, ("shape", "16")),
    ({"x": tensor(np.ones((1, 16, 1), np.float32))}, ("shape",)),
    ({"x": {"dtype": "float32", "shape": [1, 16], "data": b"\0" * 63}}, ("63", "64")),
    ({"x": {"dtype": "complex64", "shape": [1, 16], "data": b""}}, ("dtype",)),
    ({"x": {"dtype": "float32", "shape": [1, -16], "data": b""}}, ("shape",)),
    ({"x": {"dtype": "float32", "shape": [1, 16], "data": "text"}}, ("bin",)),
    ({}, ("lacks", "x")),
    ({"x": tensor(X), "z": tensor(X)}, ("'z'",)),
    ({"x": tensor(np.ones((40, 16), np.float32))}, ("batch",)),  # over max_batch_size 32
])
def test_bad_tensors(module_server, inputs, words):
    with connect(module_server.socket_path) as s:
        r = call(s, op="infer", id=5, model="identity", inputs=inputs)
        assert r["id"] == 5 and r["ok"] is False, r
        assert r["error"]["code"] == "INVALID_ARGUMENT"
        for w in words:
            assert w in r["error"]["message"], r["error"]["message"]
        assert call(s, op="health", id=6)["ok"]


def test_other_bad_fields(module_server):
    with connect(module_server.socket_path) as s:
        for msg, word in [
            ({"model": "identity", "inputs": {"x": tensor(X)}, "outputs": ["nope"]}, "nope"),
            ({"model": "identity", "inputs": {"x": tensor(X)}, "timeout_ms": -5}, "timeout"),
            ({"model": "identity", "inputs": {"x": tensor(X)}, "priority": 3}, "priority"),
            ({"model": 5, "inputs": {}}, "model"),
            ({"model": "identity", "version": "one", "inputs": {}}, "version"),
        ]:
            r = call(s, op="infer", id=1, **msg)
            assert r["error"]["code"] == "INVALID_ARGUMENT", r
            assert word in r["error"]["message"]
        r = call(s, op="hello", id=2, v=2)
        assert r["error"]["code"] == "INVALID_ARGUMENT"


def test_client_disconnects_with_requests_in_flight(module_server):
    img = np.zeros((8, 3, 224, 224), np.float32)
    for _ in range(3):
        s = connect(module_server.socket_path)
        for i in range(20):
            s.sendall(frame({"op": "infer", "id": i, "model": "cnn",
                             "inputs": {"image": tensor(img)}}))
        s.close()  # gone before any answer
    ok_infer(module_server.socket_path)
    with connect(module_server.socket_path) as s:
        st = call(s, op="stats", id=1, model="cnn")
        assert st["ok"]
    assert module_server.proc.poll() is None
