"""The benchmarks' bare servers answer what they are asked: the floors they print are of
real round trips (each server started as its own process, a real client over 127.0.0.1 or
a Unix socket, the identity model's answer compared with its input)."""

from __future__ import annotations

import json
import urllib.request
from multiprocessing import shared_memory

import numpy as np
import pytest

from appliance.demo.models import BUILDERS
from benchmarks.bare_servers import bare_server, socket_loop


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return BUILDERS["identity"](tmp_path_factory.mktemp("bare") / "identity.onnx")


def _x() -> np.ndarray:
    return np.arange(16, dtype=np.float32).reshape(1, 16) * 0.5


def test_bare_socket_answers_the_frame_and_the_shared_memory_input(identity):
    import socket

    x = _x()
    region = shared_memory.SharedMemory(create=True, size=x.nbytes)
    try:
        np.ndarray(x.shape, np.float32, region.buf)[:] = 3 * x
        with bare_server("socket", {"identity": identity}, shm=region.name) as path:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                for frame, want in (([x.nbytes.to_bytes(4, "little") + b"\0", x.tobytes()], x),
                                    ([bytes(5)], 3 * x)):  # length 0: the region's input
                    sock.sendmsg(frame)
                    size = int.from_bytes(sock.recv(4, socket.MSG_WAITALL), "little")
                    got = np.frombuffer(sock.recv(size, socket.MSG_WAITALL), np.float32)
                    np.testing.assert_array_equal(got, want.ravel())
            for concurrency in (1, 4):
                figures = socket_loop(path, 0, x, concurrency, 0.3, warmup_s=0.05)
                assert figures["rps"] > 0 and figures["p50"] > 0
    finally:
        region.close()
        region.unlink()


def test_bare_http_answers_triton_binary_and_json_requests(identity):
    x = _x()
    with bare_server("http", {"identity": identity}) as address:
        url = f"http://{address}/v2/models/identity"
        meta = json.load(urllib.request.urlopen(url, timeout=30))
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
        head = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        req = urllib.request.Request(f"{url}/infer", data=head + x.tobytes(), headers={
            "Inference-Header-Content-Length": str(len(head)),
            "Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
            at = int(resp.headers["Inference-Header-Content-Length"])
        out = json.loads(body[:at])["outputs"][0]
        assert out["shape"] == [1, 16]
        np.testing.assert_array_equal(np.frombuffer(body[at:], np.float32), x.ravel())
        # JSON tensors both ways, nested as the shape says.
        req = urllib.request.Request(f"{url}/infer", data=json.dumps({"inputs": [
            {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x.tolist()}]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            out = json.load(resp)["outputs"][0]
        assert out["shape"] == [1, 16] and out["data"] == x.ravel().tolist()


def test_bare_grpc_answers_tritonclient(identity):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    x = _x()
    with bare_server("grpc", {"identity": identity}) as address:
        client = grpcclient.InferenceServerClient(address)
        try:
            assert client.is_model_ready("identity")
            config = client.get_model_config("identity", as_json=True)["config"]
            assert config["max_batch_size"] == 32
            given = grpcclient.InferInput("x", [1, 16], "FP32")
            given.set_data_from_numpy(x)
            result = client.infer("identity", [given])
            np.testing.assert_array_equal(result.as_numpy("y"), x)
        finally:
            client.close()
