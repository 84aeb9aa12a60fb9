"""The real tritonclient.grpc client (and raw messages from outpost's own stubs, for what
tritonclient never sends) against the real `outpost serve --grpc` process: every RPC, the
stream, model control, shared memory, and bad input answered with the right status code
and a message naming the field."""

from __future__ import annotations

import os
import queue
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as gc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from appliance.client import Client
from appliance.demo.models import DEMO_MODELS, sample_inputs
from appliance.transport.grpc import inference_pb2 as pb
from appliance.transport.grpc.inference_pb2_grpc import GRPCInferenceServiceStub
from tests.support.process_state import open_fds
from tests.transport.grpc.conftest import served_grpc

TOKEN = "grpc-s3cret"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def served(demo_files, extra_models, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("grpc-token") / "token"
    token_file.write_text(TOKEN + "\n")
    yield from served_grpc(
        {**demo_files, **extra_models},
        {"admin_token_file": str(token_file), "max_message_bytes": MAX_MESSAGE},
        configs={"slow": "max_batch_size = 1\n"}, http=True)


@pytest.fixture
def client(served):
    c = gc.InferenceServerClient(served[1])
    yield c
    c.close()


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served[1]) as channel:
        yield GRPCInferenceServiceStub(channel)


def refused(call, code: str, *words: str) -> str:
    """``call()`` fails with gRPC status ``code`` and a message holding each of ``words``;
    returns the message."""
    with pytest.raises((InferenceServerException, grpc.RpcError)) as caught:
        call()
    exc = caught.value
    if isinstance(exc, grpc.RpcError):
        status, message = str(exc.code()), exc.details()
    else:
        status, message = exc.status(), exc.message()
    assert status == f"StatusCode.{code}", (status, message)
    for word in words:
        assert word in message, (word, message)
    assert "Traceback" not in message
    return message


def tensor(name: str, array: np.ndarray, datatype: str) -> gc.InferInput:
    t = gc.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def fp32(name: str, array: np.ndarray) -> gc.InferInput:
    return tensor(name, array, "FP32")


# -- health, metadata, config, statistics ------------------------------------------------

def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "outpost"
    assert {"model_repository", "statistics", "system_shared_memory"} <= set(meta.extensions)


def test_model_metadata_ready_and_config(client):
    meta = client.get_model_metadata("cnn", as_json=True)
    assert meta["name"] == "cnn" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32",
                               "shape": ["-1", "3", "224", "224"]}]
    assert client.get_model_metadata("cnn", "1") == client.get_model_metadata("cnn")
    assert client.is_model_ready("cnn") and client.is_model_ready("cnn", "1")
    assert not client.is_model_ready("nope")  # as Triton: not ready, not an error
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 32 and config.platform == "onnxruntime_onnx"
    assert config.input[0].name == "features" and list(config.input[0].dims) == [32]
    assert config.input[0].data_type == pb.TYPE_FP32
    assert list(config.output[0].dims) == [3]
    assert config.instance_group[0].count == 1
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0
    refused(lambda: client.get_model_metadata("nope"), "NOT_FOUND", "'nope'")
    refused(lambda: client.get_model_config("mlp", "x1"), "INVALID_ARGUMENT", "version",
            "'x1'")
    refused(lambda: client.get_model_config(""), "INVALID_ARGUMENT", "'name'")


def test_statistics(client):
    client.infer("identity", [fp32("x", sample_inputs("identity")["x"])])
    stats = client.get_inference_statistics("identity").model_stats
    assert len(stats) == 1 and stats[0].name == "identity" and stats[0].version == "1"
    assert stats[0].inference_count >= 1
    assert stats[0].inference_stats.success.count >= 1
    every = {s.name for s in client.get_inference_statistics().model_stats}
    assert {"identity", "mlp", "cnn", "slow", "pair"} <= every
    refused(lambda: client.get_inference_statistics("nope"), "NOT_FOUND", "'nope'")


# -- infer -------------------------------------------------------------------------------

@pytest.mark.parametrize("model", DEMO_MODELS)
def test_infer_equals_socket(served, client, model):
    inputs = sample_inputs(model, batch=1, seed=3)
    with Client(served[0].socket_path) as c:
        expected = c.infer(model, inputs).outputs
    result = client.infer(model, [fp32(n, a) for n, a in inputs.items()], request_id="r-1")
    response = result.get_response()
    assert response.id == "r-1" and response.model_version == "1"
    for name, array in expected.items():
        np.testing.assert_allclose(result.as_numpy(name), array, rtol=1e-5, atol=1e-6)


def test_typed_contents_and_requested_outputs(stub):
    """tritonclient sends raw bytes; other clients send typed lists: INT8 in
    int_contents, INT64 in int64_contents. One output asked for: only it comes back."""
    a = np.array([[-128, 0, 5, 127]], np.int8)
    b = np.array([[2**40, -1, 0, 7]], np.int64)
    request = pb.ModelInferRequest(model_name="pair", id="typed")
    request.inputs.add(name="a", datatype="INT8", shape=[1, 4]).contents.int_contents.extend(
        a.ravel().tolist())
    request.inputs.add(name="b", datatype="INT64", shape=[1, 4]).contents.int64_contents.extend(
        b.ravel().tolist())
    request.outputs.add(name="b_out")
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["b_out"]
    assert response.outputs[0].datatype == "INT64" and list(response.outputs[0].shape) == [1, 4]
    assert np.array_equal(np.frombuffer(response.raw_output_contents[0], "<i8"), b.ravel())
    del request.outputs[:]
    response = stub.ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["a_out", "b_out"]
    assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.int8), a.ravel())


def test_unknown_output_and_wrong_dtype(client):
    x = fp32("features", sample_inputs("mlp")["features"])
    refused(lambda: client.infer("mlp", [x], outputs=[gc.InferRequestedOutput("nope")]),
            "INVALID_ARGUMENT", "output 'nope'")
    ints = tensor("features", np.zeros((1, 32), np.int32), "INT32")
    refused(lambda: client.infer("mlp", [ints]), "INVALID_ARGUMENT", "features")
    refused(lambda: client.infer("nope", [x]), "NOT_FOUND", "'nope'")
    refused(lambda: client.infer("mlp", [x], priority=7), "INVALID_ARGUMENT", "priority")


def _request(model="mlp", datatype="FP32", shape=(1, 32), raw=None, **contents):
    request = pb.ModelInferRequest(model_name=model)
    t = request.inputs.add(name="features", datatype=datatype, shape=list(shape))
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    if raw is not None:
        request.raw_input_contents.extend(raw)
    return request


BAD_INPUTS = {  # request -> (code, words the message must hold)
    "contents-count": (_request(fp32_contents=[0.5] * 31),
                       ("INVALID_ARGUMENT", "input 'features'", "31 elements",
                        "contents.fp32_contents")),
    "contents-field": (_request(int64_contents=[1] * 32),
                       ("INVALID_ARGUMENT", "input 'features'", "FP32",
                        "contents.int64_contents")),
    "contents-range": (_request(model="pair", datatype="INT8", shape=(1, 4),
                                int_contents=[1, 2, 3, 300]),
                       ("INVALID_ARGUMENT", "input 'features'", "does not fit INT8")),
    "no-data": (_request(), ("INVALID_ARGUMENT", "input 'features'", "carries no data")),
    "raw-length": (_request(raw=[b"\0" * 100]),
                   ("INVALID_ARGUMENT", "input 'features'", "100 bytes",
                    "raw_input_contents", "128")),
    "raw-count": (_request(raw=[b"\0" * 128, b"\0" * 4]),
                  ("INVALID_ARGUMENT", "raw_input_contents holds 2")),
    "raw-and-contents": (_request(raw=[b"\0" * 128], fp32_contents=[0.0] * 32),
                         ("INVALID_ARGUMENT", "input 'features'", "raw_input_contents")),
    # 4 GiB declared, 128 bytes sent: refused by the sizes, nothing allocated
    "4gb-raw": (_request(shape=(1 << 25, 32), raw=[b"\0" * 128]),
                ("INVALID_ARGUMENT", "input 'features'", "4294967296")),
    "4gb-contents": (_request(shape=(1 << 25, 32), fp32_contents=[0.0] * 32),
                     ("INVALID_ARGUMENT", "input 'features'", "1073741824")),
    "negative-dim": (_request(shape=(-1, 32)), ("INVALID_ARGUMENT", "input 'features'",
                                                "shape")),
    "bytes": (_request(datatype="BYTES", bytes_contents=[b"x"]),
              ("INVALID_ARGUMENT", "input 'features'", "BYTES")),
    "odd-datatype": (_request(datatype="FLOAT"), ("INVALID_ARGUMENT", "input 'features'",
                                                  "'FLOAT'")),
    "version": (pb.ModelInferRequest(model_name="mlp", model_version="v2"),
                ("INVALID_ARGUMENT", "model_version", "'v2'")),
    "no-model": (pb.ModelInferRequest(), ("INVALID_ARGUMENT", "model_name")),
    # an unknown model is NOT_FOUND whatever else is wrong
    "unknown-model-first": (_request(model="nope", raw=[b"\0"]), ("NOT_FOUND", "'nope'")),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_naming_the_field(stub, case):
    request, (code, *words) = BAD_INPUTS[case]
    refused(lambda: stub.ModelInfer(request, timeout=10), code, *words)


def test_bad_parameters(stub):
    request = _request(fp32_contents=[0.0] * 32)
    request.parameters["timeout"].string_param = "soon"
    refused(lambda: stub.ModelInfer(request, timeout=10), "INVALID_ARGUMENT",
            "parameters.timeout")
    request = _request(fp32_contents=[0.0] * 32)
    request.parameters["sequence_id"].int64_param = 3
    refused(lambda: stub.ModelInfer(request, timeout=10), "INVALID_ARGUMENT",
            "parameters.sequence_id")


def test_deadlines(client):
    x = fp32("x", np.zeros((1, 3, 64, 64), np.float32))
    # the call's deadline, passed before it is served (the client's own clock, or ours)
    refused(lambda: client.infer("slow", [x], client_timeout=1e-6), "DEADLINE_EXCEEDED")
    # parameters.timeout: microseconds, as on HTTP; 1 us is past once queued
    refused(lambda: client.infer("slow", [x], timeout=1), "DEADLINE_EXCEEDED")
    assert client.infer("slow", [x], timeout=10_000_000, client_timeout=10).as_numpy(
        "y").shape == (1, 64)


def test_message_over_the_limit(client):
    image = sample_inputs("cnn", batch=2)["image"]  # 1.2 MB, over 1 MiB
    refused(lambda: client.infer("cnn", [fp32("image", image)]), "RESOURCE_EXHAUSTED")
    assert client.is_server_live()


# -- the stream ----------------------------------------------------------------------------

def test_stream_answers_requests_in_flight_together(client):
    """Slow requests, then quick ones and bad ones on one stream: answers come as each
    completes (a stream answered in order would give every slow one first), errors come
    in the stream and the stream goes on. The slow model runs one image at a time (about
    20 ms each), so the last of five finishes some 80 ms after the quick ones could."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    slows = [f"slow-{i}" for i in range(5)]
    try:
        slow = fp32("x", np.zeros((1, 3, 64, 64), np.float32))
        for rid in slows:
            client.async_stream_infer("slow", [slow], request_id=rid)
        features = sample_inputs("mlp", batch=1, seed=1)["features"]
        for i in range(6):
            client.async_stream_infer("mlp", [fp32("features", features)],
                                      request_id=f"q{i}")
        client.async_stream_infer("nope", [fp32("features", features)], request_id="bad-1")
        client.async_stream_infer("mlp", [fp32("features", features[:, :5])],
                                  request_id="bad-2")
        got = [answers.get(timeout=30) for _ in range(13)]
    finally:
        client.stop_stream()
    ids = [r.get_response().id for r, e in got if e is None]
    errors = sorted(e.message() for r, e in got if e is not None)
    assert sorted(ids) == sorted([*slows, "q0", "q1", "q2", "q3", "q4", "q5"])
    # not in the order sent: some quick answer overtook the slow ones
    assert ids.index("slow-4") > min(ids.index(f"q{i}") for i in range(6)), ids
    assert len(errors) == 2
    assert any("'nope'" in e for e in errors), errors
    assert any("features" in e and "'nope'" not in e for e in errors), errors
    first = next(r for r, e in got if e is None and r.get_response().id == "q0")
    assert first.as_numpy("probs").shape == (1, 3)


VANISHING_CLIENT = """
import sys, time
import numpy as np
import tritonclient.grpc as gc
c = gc.InferenceServerClient(sys.argv[1])
c.start_stream(lambda result, error: print("answered", flush=True))
x = gc.InferInput("x", [1, 3, 64, 64], "FP32")
x.set_data_from_numpy(np.zeros((1, 3, 64, 64), np.float32))
for i in range(40):
    c.async_stream_infer("slow", [x], request_id=str(i))
time.sleep(60)
"""


def _settled(read, timeout_s: float = 10.0, quiet_s: float = 0.3):
    """``read()`` once it has stopped changing for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    return last


def test_a_client_that_vanishes_mid_stream_leaves_nothing(served, client):
    """40 requests of 20 ms queued on a stream, the client killed after the first answer:
    the rest are dropped, its connection closed, and the server serves on."""
    proc, target = served
    count = lambda: client.get_inference_statistics("slow").model_stats[0].inference_count
    before = count()
    fds = open_fds(proc.pid)  # our own channel is open already
    child = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, target],
                             stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline().strip() == "answered"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    ran = _settled(count) - before
    assert 1 <= ran < 30, ran  # the queued ones were cancelled, not run
    assert _settled(lambda: open_fds(proc.pid)) <= fds
    x = fp32("x", np.zeros((1, 3, 64, 64), np.float32))
    assert client.infer("slow", [x]).as_numpy("y").shape == (1, 64)


# -- model control -------------------------------------------------------------------------

def test_model_control_needs_the_admin_token(client):
    refused(lambda: client.unload_model("mlp"), "UNAUTHENTICATED", "authorization",
            "admin token")
    refused(lambda: client.get_model_repository_index(
        headers={"authorization": "Bearer wrong"}), "UNAUTHENTICATED", "authorization")
    index = client.get_model_repository_index(headers=ADMIN, as_json=True)["models"]
    assert {"name": "mlp", "version": "1", "state": "READY"} in index
    x = fp32("features", sample_inputs("mlp")["features"])
    client.unload_model("mlp", headers=ADMIN)
    try:
        refused(lambda: client.infer("mlp", [x]), "NOT_FOUND", "'mlp'")
        assert not client.is_model_ready("mlp")
        refused(lambda: client.load_model("mlp", headers=ADMIN, config="{}"),
                "INVALID_ARGUMENT", "load parameters (config)")
        refused(lambda: client.load_model("nope", headers=ADMIN), "NOT_FOUND", "nope")
    finally:
        client.load_model("mlp", headers=ADMIN)
    assert client.is_model_ready("mlp")
    assert client.infer("mlp", [x]).as_numpy("probs").shape == (1, 3)


# -- shared memory -------------------------------------------------------------------------

@pytest.fixture
def regions():
    made = []

    def make(name: str, byte_size: int):
        key = f"/op-grpc-{os.getpid()}-{name}"
        made.append(shm.create_shared_memory_region(name, key, byte_size))
        return made[-1], key

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_shared_memory_input_and_output(client, regions):
    a = np.array([[1, -2, 3, -4]], np.int8)
    b = np.array([[10, 20, 30, 2**50]], np.int64)
    in_handle, in_key = regions("in", 64)
    out_handle, out_key = regions("out", 64)
    shm.set_shared_memory_region(in_handle, [a], offset=8)
    refused(lambda: client.register_system_shared_memory("in", in_key, 64),
            "UNAUTHENTICATED", "authorization")
    client.register_system_shared_memory("in", in_key, 64, headers=ADMIN)
    client.register_system_shared_memory("out", out_key, 64, headers=ADMIN)
    try:
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status["in"] == {"name": "in", "key": in_key, "byte_size": "64"}
        assert set(status) == {"in", "out"}
        refused(lambda: client.get_system_shared_memory_status("nope"), "NOT_FOUND", "'nope'")
        refused(lambda: client.register_system_shared_memory("x", "/no-such-op-key", 8,
                                                             headers=ADMIN),
                "INVALID_ARGUMENT", "'key'")
        refused(lambda: client.register_system_shared_memory("in", in_key, 64,
                                                             headers=ADMIN),
                "INVALID_ARGUMENT", "'in'", "already registered")

        # 'a' from the region (no raw entry), 'b' as raw bytes: the raw list skips 'a'
        ta = gc.InferInput("a", [1, 4], "INT8")
        ta.set_shared_memory("in", 4, offset=8)
        tb = tensor("b", b, "INT64")
        out_a = gc.InferRequestedOutput("a_out")
        out_a.set_shared_memory("out", 4, offset=16)
        out_b = gc.InferRequestedOutput("b_out")
        result = client.infer("pair", [ta, tb], outputs=[out_a, out_b])
        response = result.get_response()
        assert [o.name for o in response.outputs] == ["a_out", "b_out"]
        first = response.outputs[0]
        assert first.datatype == "INT8" and list(first.shape) == [1, 4]
        assert first.parameters["shared_memory_region"].string_param == "out"
        assert first.parameters["shared_memory_byte_size"].int64_param == 4
        # one raw entry per output, as Triton: a_out's is empty, b_out's found by position
        assert [len(r) for r in response.raw_output_contents] == [0, b.nbytes]
        assert np.array_equal(result.as_numpy("b_out"), b)
        written = shm.get_contents_as_numpy(out_handle, np.int8, [1, 4], offset=16)
        assert np.array_equal(written, a)

        ta.set_shared_memory("in", 8, offset=8)  # 8 bytes for 4 of INT8
        refused(lambda: client.infer("pair", [ta, tb]), "INVALID_ARGUMENT", "input 'a'",
                "8 bytes")
        ta.set_shared_memory("in", 4, offset=62)  # past the region's end
        refused(lambda: client.infer("pair", [ta, tb]), "INVALID_ARGUMENT", "input 'a'",
                "past the end")
        ta.set_shared_memory("nope", 4)
        refused(lambda: client.infer("pair", [ta, tb]), "INVALID_ARGUMENT", "input 'a'",
                "'nope'")
    finally:
        client.unregister_system_shared_memory(headers=ADMIN)
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


def test_cuda_shared_memory_is_not_served(client):
    refused(lambda: client.register_cuda_shared_memory("r", b"aGFuZGxl", 0, 8),
            "UNIMPLEMENTED", "CUDA", "system shared memory")
    # none can be registered: none to list, and unregistering them all is done at once
    # (perf_analyzer does it before and after each run)
    assert client.get_cuda_shared_memory_status(as_json=True) == {}
    refused(lambda: client.get_cuda_shared_memory_status("r"), "NOT_FOUND", "'r'", "CUDA")
    client.unregister_cuda_shared_memory()


# -- what the server counts ----------------------------------------------------------------

def test_answers_counted_per_protocol(served, client):
    x = fp32("x", sample_inputs("identity")["x"])
    client.infer("identity", [x])
    refused(lambda: client.infer("nope", [x]), "NOT_FOUND")
    http = served[0].ready_record()["http"]
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = dict(re.findall(
        r'^outpost_protocol_requests_total\{code="(\w+)",protocol="grpc"\} (\S+)$', text,
        re.M))
    assert float(counts["OK"]) >= 1 and float(counts["NOT_FOUND"]) >= 1, counts

