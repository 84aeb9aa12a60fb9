"""Backpressure and deadlines through the real server: full queues, timeouts, frame limits."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from tests.conftest import add_demo_models
from tests.support.wire import call, connect, frame, recv, tensor

CNN_CONFIG = """
max_batch_size = 4
[dynamic_batching]
max_queue_size = 3
priority_levels = 2
default_priority_level = 1
"""


@pytest.fixture
def limited_server(short_tmp, demo_files):
    add_demo_models(short_tmp, demo_files, {"cnn": CNN_CONFIG})
    proc = ServerProcess(short_tmp, extra_args=["--max-frame-bytes", "65536"]).start()
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def test_configured_frame_limit(limited_server):
    img = tensor(np.zeros((4, 3, 224, 224), np.float32))
    img_frame = frame({"op": "infer", "id": 0, "model": "cnn", "inputs": {"image": img}})
    # 4x3x224x224 float32 is 2.4 MB: over this server's 64 KiB frame limit.
    with connect(limited_server.socket_path) as s:
        s.sendall(img_frame[:4096])  # the server answers from the header alone
        r = recv(s)
        assert r["id"] is None and "65536" in r["error"]["message"]
    with Client(limited_server.socket_path) as c:
        assert c.hello()["max_frame_bytes"] == 65536
    small = tensor(np.zeros((1, 3, 32, 32), np.float32))
    with connect(limited_server.socket_path) as s:
        r = call(s, op="infer", id=1, model="cnn", inputs={"image": small})
        assert r["error"]["code"] == "INVALID_ARGUMENT"  # wrong spatial shape still checked


ONE_AT_A_TIME = """
max_batch_size = 1
[dynamic_batching]
max_queue_size = 2
"""


def test_timeouts_and_queue_limits_on_a_busy_model(short_tmp):
    from appliance.models.repository import Repository
    from tests.support.slow_model import slow_model

    (short_tmp / "c.toml").write_text(ONE_AT_A_TIME)
    Repository(short_tmp).add("slow", slow_model(short_tmp / "slow.onnx"),
                              config_path=short_tmp / "c.toml")
    with ServerProcess(short_tmp) as server:
        img = tensor(np.random.default_rng(1).random((1, 3, 64, 64), np.float32))
        with connect(server.socket_path) as s:
            n = 12
            for i in range(n):
                s.sendall(frame({"op": "infer", "id": i, "model": "slow",
                                 "inputs": {"x": img}}))
            got = {r["id"]: r for r in (recv(s) for _ in range(n))}
        codes = [got[i]["error"]["code"] if not got[i]["ok"] else "OK" for i in range(n)]
        assert codes.count("RESOURCE_EXHAUSTED") >= 1, codes
        assert codes.count("OK") >= 3, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        full = next(r for r in got.values() if not r["ok"])
        assert "max_queue_size" in full["error"]["message"]

        with connect(server.socket_path) as s:
            for i in range(2):  # keep the instance busy, fill the queue
                s.sendall(frame({"op": "infer", "id": i, "model": "slow",
                                 "inputs": {"x": img}}))
            s.sendall(frame({"op": "infer", "id": 99, "model": "slow", "timeout_ms": 1,
                             "inputs": {"x": img}}))
            got = {r["id"]: r for r in (recv(s) for _ in range(3))}
        assert got[99]["error"]["code"] == "DEADLINE_EXCEEDED"
        assert all(got[i]["ok"] for i in range(2))

        with Client(server.socket_path) as c:
            st = c.stats("slow")["models"][0]
        assert st["failures_by_code"]["DEADLINE_EXCEEDED"] == 1
        assert st["failures_by_code"]["RESOURCE_EXHAUSTED"] == codes.count("RESOURCE_EXHAUSTED")
        assert st["avg_batch_size"] == 1.0


def test_model_without_batch_dim_runs_one_request_at_a_time(short_tmp):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Mul", ["a", "b"], ["c"])], "mul",
                          [helper.make_tensor_value_info("a", TensorProto.INT32, [2, 3]),
                           helper.make_tensor_value_info("b", TensorProto.INT32, [2, 3])],
                          [helper.make_tensor_value_info("c", TensorProto.INT32, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(short_tmp / "mul.onnx"))
    from appliance.models.repository import Repository

    Repository(short_tmp).add("mul", short_tmp / "mul.onnx")
    with ServerProcess(short_tmp) as server, Client(server.socket_path) as c:
        assert c.metadata("mul")["max_batch_size"] == 0
        assert c.metadata("mul")["inputs"][0]["shape"] == [2, 3]
        a = np.arange(6, dtype=np.int32).reshape(2, 3)
        np.testing.assert_array_equal(c.infer("mul", {"a": a, "b": a})["c"], a * a)
        st = c.stats("mul")["models"][0]
        assert st["avg_batch_size"] == 1.0
