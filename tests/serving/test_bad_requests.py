"""One table of bad requests, sent through every transport to one real server: each gets
the same error code (on HTTP, that code's status), because every check is the service's.

Each row says what is wrong once; ``socket_request`` and ``http_request`` put it on their
wire (a msgpack map over the Unix socket, a v2 JSON body over HTTP).
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from appliance.transport.http.errors import STATUS_BY_CODE
from tests.support.http_server import served_http
from tests.support.wire import call, connect, tensor

X = np.zeros((1, 16), np.float32)
IMAGES = np.zeros((8, 3, 224, 224), np.float32)


@dataclass
class Bad:
    why: str
    code: str
    model: str = "identity"
    version: int | None = None
    inputs: dict = field(default_factory=lambda: {"x": X})
    outputs: list | None = None
    params: dict = field(default_factory=dict)  # priority, routing_key, timeout_us
    broken_data: bool = False  # the first input's data is one byte short


TABLE = [
    Bad("unknown model", "NOT_FOUND", model="nope"),
    Bad("unknown version", "NOT_FOUND", version=99),
    Bad("unknown model, broken inputs too: NOT_FOUND first", "NOT_FOUND", model="nope",
        broken_data=True),
    Bad("unknown version, bad timeout too: NOT_FOUND first", "NOT_FOUND", version=99,
        params={"timeout_us": -5}),
    Bad("wrong dtype", "INVALID_ARGUMENT", inputs={"x": X.astype(np.float64)}),
    Bad("wrong shape", "INVALID_ARGUMENT", inputs={"x": np.zeros((1, 15), np.float32)}),
    Bad("wrong rank", "INVALID_ARGUMENT", inputs={"x": np.zeros((16,), np.float32)}),
    Bad("missing input", "INVALID_ARGUMENT", inputs={}),
    Bad("extra input", "INVALID_ARGUMENT", inputs={"x": X, "z": X}),
    Bad("batch over max_batch_size", "INVALID_ARGUMENT",
        inputs={"x": np.zeros((40, 16), np.float32)}),
    Bad("data shorter than its shape", "INVALID_ARGUMENT", broken_data=True),
    Bad("unknown output", "INVALID_ARGUMENT", outputs=["nope"]),
    Bad("priority out of range", "INVALID_ARGUMENT", params={"priority": 3}),
    Bad("priority not an integer", "INVALID_ARGUMENT", params={"priority": "high"}),
    Bad("negative timeout", "INVALID_ARGUMENT", params={"timeout_us": -5000}),
    Bad("routing key not a string", "INVALID_ARGUMENT", params={"routing_key": 5}),
    Bad("deadline passes while the batch runs", "DEADLINE_EXCEEDED", model="cnn",
        inputs={"image": IMAGES}, params={"timeout_us": 1000}),
]


def socket_request(bad: Bad) -> dict:
    msg: dict = {"op": "infer", "id": 1, "model": bad.model,
                 "inputs": {n: tensor(a) for n, a in bad.inputs.items()}}
    if bad.broken_data:
        first = next(iter(msg["inputs"].values()))
        first["data"] = first["data"][:-1]
    if bad.version is not None:
        msg["version"] = bad.version
    if bad.outputs is not None:
        msg["outputs"] = bad.outputs
    for key, value in bad.params.items():
        if key == "timeout_us":
            msg["timeout_ms"] = value // 1000
        else:
            msg[key] = value
    return msg


def http_request(bad: Bad) -> tuple[str, bytes]:
    inputs = []
    for name, array in bad.inputs.items():
        data = array.ravel().tolist()
        if bad.broken_data and not inputs:
            data = data[:-1]
        inputs.append({"name": name, "shape": list(array.shape),
                       "datatype": {"float32": "FP32", "float64": "FP64"}[array.dtype.name],
                       "data": data})
    body: dict = {"inputs": inputs}
    if bad.outputs is not None:
        body["outputs"] = [{"name": n} for n in bad.outputs]
    params = {("timeout" if k == "timeout_us" else k): v for k, v in bad.params.items()}
    if params:
        body["parameters"] = params
    path = f"/v2/models/{bad.model}"
    if bad.version is not None:
        path += f"/versions/{bad.version}"
    return path + "/infer", json.dumps(body).encode()


@pytest.fixture(scope="module")
def served(demo_files):
    yield from served_http(demo_files)


@pytest.mark.parametrize("bad", TABLE, ids=[b.why for b in TABLE])
def test_the_same_code_on_every_transport(served, bad):
    proc, url = served
    with connect(proc.socket_path) as s:
        r = call(s, **socket_request(bad))
    assert r["ok"] is False and r["error"]["code"] == bad.code, r
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        path, body = http_request(bad)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == STATUS_BY_CODE[bad.code], answer
    assert answer["error"]


def test_the_table_holds_good_requests_apart(served):
    """The same requests made well are answered on both transports (so each row above
    fails for the reason it names)."""
    good = Bad("good", "OK")
    proc, url = served
    with connect(proc.socket_path) as s:
        assert call(s, **socket_request(good))["ok"]
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        path, body = http_request(good)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    assert resp.status == 200
