"""Raw HTTP against the real server: malformed and hostile requests, limits, auth."""

from __future__ import annotations

import http.client
import json
import socket
import time

import numpy as np
import pytest

from tests.support.http_server import served_http

TOKEN = "raw-token"
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def served(demo_files):
    yield from served_http(demo_files, {
        "admin_token": TOKEN, "max_body_bytes": MAX_BODY, "request_timeout_s": 0.5,
        "max_inflight": 1})


@pytest.fixture
def conn(served):
    _, url = served
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    yield c
    c.close()


def call(conn, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, dict(resp.getheaders()), data


def error_of(status_headers_body) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers["Content-Type"].startswith("application/json"), headers
    doc = json.loads(body)
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]
    return status, doc["error"]


def identity_request(**overrides) -> dict:
    tensor = {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))}
    tensor.update(overrides)
    return {"inputs": [tensor]}


def test_json_infer_works(conn):
    status, _, body = call(conn, "POST", "/v2/models/identity/infer", identity_request())
    assert status == 200
    out = json.loads(body)["outputs"][0]
    assert out == {"name": "y", "datatype": "FP32", "shape": [1, 16],
                   "data": [float(i) for i in range(16)]}


def test_nested_json_data_is_accepted(conn):
    rows = [[float(i + 16 * r) for i in range(16)] for r in range(2)]
    status, _, body = call(conn, "POST", "/v2/models/identity/infer",
                           identity_request(shape=[2, 16], data=rows))
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == [v for row in rows for v in row]


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "'inputs'"),
    (b'{"inputs": [{"shape": [1, 16], "datatype": "FP32", "data": []}]}', "name"),
])
def test_malformed_json(conn, body, words):
    status, message = error_of(call(conn, "POST", "/v2/models/identity/infer", body))
    assert status == 400 and words in message


@pytest.mark.parametrize("overrides, words", [
    ({"shape": [1, 17], "data": list(range(17))}, "shape [1, 17]"),
    ({"shape": [16], "data": list(range(16))}, "shape [16]"),
    ({"shape": [1, 16], "data": list(range(15))}, "15 elements"),
    ({"datatype": "FP64"}, "FP64"),
    ({"datatype": "INT32"}, "INT32"),
    ({"datatype": "BYTES"}, "does not serve"),
    ({"datatype": "FLOAT"}, "datatype 'FLOAT'"),
    ({"shape": [1, -16]}, "non-negative"),
    ({"data": ["a"] * 16}, "numbers"),
    ({"datatype": "FP16", "data": [1e6] * 16}, "does not fit FP16"),
])
def test_wrong_shape_or_dtype(conn, overrides, words):
    status, message = error_of(call(conn, "POST", "/v2/models/identity/infer",
                                    identity_request(**overrides)))
    assert status == 400 and words in message, message


@pytest.mark.parametrize("body, words", [
    (b"[" * 200_000, "nested too deeply"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": '
     + b"[" * 200_000, "nested too deeply"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": '
     b"[NaN]}]}", "NaN"),
])
def test_hostile_json_is_a_400_and_the_server_keeps_serving(conn, body, words):
    status, message = error_of(call(conn, "POST", "/v2/models/identity/infer", body))
    assert status == 400 and words in message, message
    assert "recursion" not in message and "internal" not in message
    if words == "nested too deeply":
        assert "1024" in message
    status, _, body = call(conn, "POST", "/v2/models/identity/infer", identity_request())
    assert status == 200 and json.loads(body)["outputs"][0]["data"][15] == 15.0


def test_wrong_input_name(conn):
    status, message = error_of(call(conn, "POST", "/v2/models/identity/infer",
                                    identity_request(name="z")))
    assert status == 400 and "'x'" in message


def test_unknown_model_or_version(conn):
    status, message = error_of(call(conn, "POST", "/v2/models/nosuch/infer",
                                    identity_request()))
    assert status == 404 and "'nosuch'" in message
    status, message = error_of(call(conn, "POST", "/v2/models/identity/versions/9/infer",
                                    identity_request()))
    assert status == 404 and "no version 9" in message
    status, message = error_of(call(conn, "GET", "/v2/models/identity/versions/abc"))
    assert status == 400 and "positive integer" in message
    status, message = error_of(call(conn, "GET", "/v2/models/nosuch/config"))
    assert status == 404
    status, _, _ = call(conn, "GET", "/v2/models/nosuch/ready")
    assert status == 404
    status, message = error_of(call(conn, "GET", "/v2/nonsense"))
    assert status == 404 and "no route" in message
    status, message = error_of(call(conn, "DELETE", "/v2/models/identity"))
    assert status == 405


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)),
                                    "Content-Type": "application/octet-stream"}


def test_binary_request_and_response(conn):
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    body, headers = _binary_body(
        {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                     "parameters": {"binary_data_size": x.nbytes}}],
         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}, x.tobytes())
    status, resp_headers, data = call(conn, "POST", "/v2/models/identity/infer", body,
                                      headers)
    assert status == 200
    n = int(resp_headers["Inference-Header-Content-Length"])
    header = json.loads(data[:n])
    assert header["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 16],
                                  "parameters": {"binary_data_size": x.nbytes}}]
    np.testing.assert_array_equal(np.frombuffer(data[n:], np.float32).reshape(2, 16), x)


@pytest.mark.parametrize("case, words", [
    ("size_too_big", "only 64 bytes"),
    ("size_wrong", "needs 64"),
    ("trailing", "after the last input"),
    ("header_len", "Inference-Header-Content-Length"),
    ("both", "both 'data' and binary_data_size"),
])
def test_bad_binary_requests(conn, case, words):
    x = np.zeros((1, 16), np.float32).tobytes()
    size = {"size_too_big": 200, "size_wrong": 60}.get(case, 64)
    tensor = {"name": "x", "shape": [1, 16], "datatype": "FP32",
              "parameters": {"binary_data_size": size}}
    if case == "both":
        tensor["data"] = [0.0] * 16
    blob = x[:60] if case == "size_wrong" else x
    body, headers = _binary_body({"inputs": [tensor]}, blob,
                                 b"extra" if case == "trailing" else b"")
    if case == "header_len":
        headers["Inference-Header-Content-Length"] = str(len(body) + 5)
    status, message = error_of(call(conn, "POST", "/v2/models/identity/infer", body, headers))
    assert status == 400 and words in message, message


def test_oversize_body_is_refused_unread(served):
    """413 answered from the Content-Length alone: the body is never sent or read."""
    _, url = served
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    c.putrequest("POST", "/v2/models/identity/infer")
    c.putheader("Content-Length", str(MAX_BODY + 1))
    c.putheader("Content-Type", "application/json")
    c.endheaders()
    resp = c.getresponse()
    status, message = error_of((resp.status, dict(resp.getheaders()), resp.read()))
    c.close()
    assert status == 413 and "max_body_bytes" in message


def test_oversize_body_with_expect_gets_413_not_continue(served):
    """A client that asks first ('Expect: 100-continue') is told 413 before sending."""
    _, url = served
    s = socket.create_connection((url.hostname, url.port), timeout=10)
    s.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
              b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"max_body_bytes" in reply


def test_oversize_chunked_body_is_cut_off(served):
    """Without a Content-Length the server stops reading at the limit and answers 413."""
    _, url = served
    s = socket.create_connection((url.hostname, url.port), timeout=10)
    s.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"0" * (64 << 10)
    sent = 0
    try:
        while sent <= 4 * MAX_BODY:
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    try:
        while b"\r\n\r\n" not in reply:
            part = s.recv(65536)
            if not part:
                break
            reply += part
    except ConnectionResetError:
        pass
    s.close()
    # No terminating chunk was ever sent: a server still reading would answer 504 (the
    # request timeout) or nothing, so a 413 means it stopped at the limit.
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_stalled_body_times_out(served):
    """A body that never arrives is answered 504 after http.request_timeout_s."""
    _, url = served
    s = socket.create_connection((url.hostname, url.port), timeout=10)
    t0 = time.monotonic()
    s.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inp")
    time.sleep(0.1)
    # Meanwhile the one slot (http.max_inflight = 1) is taken: others get 503 at once.
    other = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    status, message = error_of(call(other, "POST", "/v2/models/identity/infer",
                                    identity_request()))
    assert status == 503 and "max_inflight" in message
    assert call(other, "GET", "/v2/health/live")[0] == 200  # probes are not limited
    other.close()
    reply = s.recv(65536)
    elapsed = time.monotonic() - t0
    s.close()
    assert reply.startswith(b"HTTP/1.1 504"), reply[:200]
    assert b"request_timeout_s" in reply
    assert 0.4 < elapsed < 5


def test_request_deadline_parameter(conn):
    """parameters.timeout (microseconds, as Triton) becomes the batcher's deadline."""
    image = {"name": "image", "shape": [1, 3, 224, 224], "datatype": "FP32",
             "parameters": {"binary_data_size": 3 * 224 * 224 * 4}}
    body, headers = _binary_body({"inputs": [image], "parameters": {"timeout": 1}},
                                 np.zeros((1, 3, 224, 224), np.float32).tobytes())
    status, message = error_of(call(conn, "POST", "/v2/models/cnn/infer", body, headers))
    assert status == 504 and "timeout" in message


def test_admin_token(conn):
    status, message = error_of(call(conn, "POST", "/v2/repository/index"))
    assert status == 401 and "Bearer" in message
    status, headers, _ = call(conn, "POST", "/v2/repository/models/mlp/unload",
                              headers={"Authorization": "Bearer wrong"})
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    status, _, _ = call(conn, "GET", "/v2/models/mlp/ready")
    assert status == 200  # the refused unload changed nothing
    status, _, body = call(conn, "POST", "/v2/repository/index", {"ready": True},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert {e["name"] for e in json.loads(body)} == {"cnn", "identity", "mlp"}
    status, message = error_of(call(conn, "POST", "/v2/repository/index", b"{oops",
                                    headers={"Authorization": f"Bearer {TOKEN}"}))
    assert status == 400 and "JSON" in message
    status, message = error_of(call(conn, "POST", "/v2/repository/index", b"[" * 200_000,
                                    headers={"Authorization": f"Bearer {TOKEN}"}))
    assert status == 400 and "nested too deeply" in message


def test_health_routes(conn):
    assert call(conn, "GET", "/v2/health/live")[0] == 200
    assert call(conn, "GET", "/v2/health/ready")[0] == 200
    status, _, body = call(conn, "GET", "/v2")
    assert status == 200 and json.loads(body)["name"] == "outpost"

