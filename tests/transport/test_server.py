"""The ops, pipelining, auth, draining and connection churn, against the real server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import numpy as np
import pytest

from appliance import errors
from appliance.client import AsyncClient, Client
from appliance.demo.launcher import ServerProcess
from appliance.demo.models import sample_inputs
from tests.support.wire import call, connect, frame, is_closed, recv, tensor


def test_all_six_ops(module_server):
    with Client(module_server.socket_path) as c:
        hello = c.hello()
        assert hello["v"] == 1 and hello["server"]["name"] == "outpost"
        assert hello["max_frame_bytes"] == 64 << 20
        assert set(hello["ops"]) >= {"hello", "infer", "models", "metadata", "health", "stats"}
        models = {m["name"]: m for m in c.models()}
        assert set(models) == {"identity", "cnn", "mlp"}
        assert models["cnn"]["active_version"] == 1
        assert models["cnn"]["versions"] == [
            {"version": 1, "state": "ready", "engine": "onnxruntime"}]
        meta = c.metadata("cnn")
        assert meta["inputs"] == [{"name": "image", "dtype": "float32",
                                   "shape": [-1, 3, 224, 224]}]
        assert meta["outputs"] == [{"name": "probs", "dtype": "float32", "shape": [-1, 10]}]
        assert meta["max_batch_size"] == 32 and meta["version"] == 1
        health = c.health()
        assert health["live"] is True and health["ready"] is True
        r = c.infer("mlp", sample_inputs("mlp", batch=4))
        probs = r["probs"]
        assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        st = c.stats("mlp")["models"][0]
        assert st["model"] == "mlp" and st["request_success"] >= 1
        assert st["inference_count"] >= 4 and st["execution_count"] >= 1


def test_outputs_match_raw_onnxruntime(module_server, demo_files):
    import onnxruntime as ort

    for name in ("identity", "cnn", "mlp"):
        inputs = sample_inputs(name, batch=2, seed=3)
        raw = ort.InferenceSession(str(demo_files[name]), providers=["CPUExecutionProvider"])
        expected = raw.run(None, inputs)[0]
        with Client(module_server.socket_path) as c:
            got = next(iter(c.infer(name, inputs).outputs.values()))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_pipelined_responses_come_back_out_of_order(module_server):
    """A slow CNN batch sent first is answered after fast identity requests sent later."""
    img = tensor(np.zeros((32, 3, 224, 224), np.float32))
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    with connect(module_server.socket_path) as s:
        s.sendall(frame({"op": "infer", "id": 1, "model": "cnn", "inputs": {"image": img}}))
        for i in range(2, 12):
            s.sendall(frame({"op": "infer", "id": i, "model": "identity",
                             "inputs": {"x": tensor(x + i)}}))
        responses = [recv(s) for _ in range(11)]
    ids = [r["id"] for r in responses]
    assert sorted(ids) == list(range(1, 12))
    assert ids[-1] == 1, ids  # the CNN batch answered last
    for r in responses:
        assert r["ok"], r
        if r["id"] != 1:
            y = np.frombuffer(r["outputs"]["y"]["data"], np.float32)
            assert y.tolist() == (x[0] + r["id"]).tolist()  # each answer is its own


def test_async_client_pipelines_many_requests(module_server):
    async def go():
        async with await AsyncClient.connect(module_server.socket_path) as c:
            xs = [np.full((1, 16), i, np.float32) for i in range(300)]
            results = await asyncio.gather(*(c.infer("identity", {"x": x}) for x in xs))
            for x, r in zip(xs, results):
                np.testing.assert_array_equal(r["y"], x)
            with pytest.raises(errors.NotFound):
                await c.infer("nope", {"x": xs[0]})
    asyncio.run(go())


def test_typed_client_errors(module_server):
    with Client(module_server.socket_path) as c:
        with pytest.raises(errors.NotFound) as e:
            c.infer("nope", {"x": np.zeros((1, 16), np.float32)})
        assert e.value.code == "NOT_FOUND"
        with pytest.raises(errors.InvalidArgument):
            c.infer("identity", {"x": np.zeros((1, 16), np.float64)})
    with pytest.raises(errors.Unavailable):
        Client(module_server.socket_path.parent / "no-such.sock")


def test_batching_forms_batches_under_concurrency(module_server):
    from appliance.demo.workload import closed_loop

    with Client(module_server.socket_path) as c:
        before = c.stats("cnn")["models"][0]
    r = asyncio.run(closed_loop("cnn", sample_inputs("cnn"), 16, 1.0,
                                path=module_server.socket_path, warmup_s=0))
    assert r.requests > 0 and not r.errors
    with Client(module_server.socket_path) as c:
        after = c.stats("cnn")["models"][0]
    rows = after["inference_count"] - before["inference_count"]
    runs = after["execution_count"] - before["execution_count"]
    assert rows >= r.requests
    assert rows / runs > 2, (rows, runs)  # 16 in flight on one instance: real batches


def test_closed_loop_counts_the_requests_started_in_its_window(module_server):
    """Against the real server: what closed_loop counts is a subset of what the server
    ran (the warm-up's requests and the drain's are not counted), and none failed."""
    from appliance.demo.workload import closed_loop

    with Client(module_server.socket_path) as c:
        before = c.stats("cnn")["models"][0]["request_success"]
    r = asyncio.run(closed_loop("cnn", sample_inputs("cnn"), 64, 1.0,
                                path=module_server.socket_path, warmup_s=0.5))
    with Client(module_server.socket_path) as c:
        served = c.stats("cnn")["models"][0]["request_success"] - before
    assert r.requests > 0 and not r.errors
    assert r.requests == len(r.latencies_s) < served


def test_the_measure_window_counts_by_start_and_ends_at_its_end(monkeypatch):
    """The counting rule itself, on a clock the test moves: a request counts when it
    started inside the window, and the window ends at its end, not at the last answer
    (the drain of the requests still in flight is not time of the window)."""
    from appliance.demo import workload

    now = [100.0]
    monkeypatch.setattr(workload, "CLOCK", lambda: now[0])
    window = workload.MeasureWindow(workload.LoadResult("m", 4), duration_s=1.0,
                                    warmup_s=0.5)
    window.answered(100.2, 100.3)  # started in the warm-up: not counted
    window.answered(100.5, 100.6)  # started as the window opens
    window.answered(101.4, 101.7)  # started inside, answered after the window ended
    window.failed(100.1, "UNAVAILABLE")  # in the warm-up: not counted
    window.failed(100.9, "UNAVAILABLE")
    now[0] = 101.75  # the drain ends a quarter of a second past the window
    result = window.close()
    assert result.requests == 2
    assert result.latencies_s == pytest.approx([0.1, 0.3])
    assert result.errors == {"UNAVAILABLE": 1}
    assert result.elapsed_s == pytest.approx(1.0)
    assert result.throughput == pytest.approx(2.0)


def test_blocking_loop_counts_like_closed_loop(module_server):
    """The blocking Client's loop measures over the same window, by the same rule."""
    from benchmarks.workload import blocking_loop

    with Client(module_server.socket_path) as c:
        before = c.stats("identity")["models"][0]["request_success"]
    r = blocking_loop("identity", sample_inputs("identity"), 0.3,
                      path=module_server.socket_path, warmup_s=0.1)
    with Client(module_server.socket_path) as c:
        served = c.stats("identity")["models"][0]["request_success"] - before
    assert r.concurrency == 1 and not r.errors
    assert 0 < r.requests == len(r.latencies_s) < served  # the warm-up's are not counted


def test_the_frames_of_one_read_run_as_one_batch(module_server):
    """A quick model (run on the loop itself) still batches: what one read brings."""
    x = sample_inputs("identity")["x"]
    with Client(module_server.socket_path) as c:
        for _ in range(50):  # enough runs for the batcher to see the model is quick
            c.infer("identity", {"x": x})
        before = c.stats("identity")["models"][0]
    s = connect(module_server.socket_path)
    s.sendall(b"".join(frame({"op": "infer", "id": i, "model": "identity",
                              "inputs": {"x": tensor(x + i)}}) for i in range(8)))
    got = {r["id"]: r for r in (recv(s) for _ in range(8))}
    s.close()
    for i, r in got.items():
        y = np.frombuffer(r["outputs"]["y"]["data"], np.float32)
        assert r["ok"] and np.allclose(y, (x + i).ravel())
    with Client(module_server.socket_path) as c:
        after = c.stats("identity")["models"][0]
    assert after["inference_count"] - before["inference_count"] == 8
    assert after["execution_count"] - before["execution_count"] == 1


def test_socket_file_mode(module_server):
    assert oct(os.stat(module_server.socket_path).st_mode & 0o777) == "0o660"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousand_connections_opened_and_dropped(module_server):
    path = str(module_server.socket_path)

    def churn(n: int) -> None:
        for i in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            if i % 3 == 0:
                s.sendall(frame({"op": "health", "id": 1}))
            elif i % 3 == 1:
                s.sendall(b"\x00\x00")  # half a header
            s.close()

    churn(300)  # reach a steady state first
    before = _rss_kib(module_server.pid)
    churn(1000)
    time.sleep(0.3)
    after = _rss_kib(module_server.pid)
    assert after - before < 8 * 1024, f"RSS grew {after - before} KiB over 1000 connections"
    with Client(module_server.socket_path) as c:
        assert c.health()["ready"]
        st = c.stats()
    assert st["pid"] == module_server.pid


def test_sigterm_finishes_in_flight_requests(short_tmp):
    from appliance.models.repository import Repository
    from tests.support.slow_model import slow_model

    Repository(short_tmp).add("slow", slow_model(short_tmp / "slow.onnx"))
    proc = ServerProcess(short_tmp).start()
    img = tensor(np.ones((4, 3, 64, 64), np.float32))
    s = connect(proc.socket_path)
    for i in range(6):
        s.sendall(frame({"op": "infer", "id": i, "model": "slow", "inputs": {"x": img}}))
    time.sleep(0.1)
    with Client(proc.socket_path) as c:
        assert c.stats("slow")["models"][0]["inflight"] > 0  # really in flight
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(errors.Unavailable):  # idle connections are closed at once
            c.infer("slow", {"x": np.ones((1, 3, 64, 64), np.float32)})
    got = [recv(s) for _ in range(6)]
    assert sorted(r["id"] for r in got) == list(range(6))
    assert all(r["ok"] for r in got), [r.get("error") for r in got]
    assert is_closed(s)
    assert proc.proc.wait(30) == 0
    assert not proc.socket_path.exists()
    # New connections are refused once it is gone.
    with pytest.raises(OSError):
        connect(proc.socket_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_and_token(repo_with_demo):
    token_file = repo_with_demo / "token"
    token_file.write_text("s3cret-token\n")
    proc = ServerProcess(repo_with_demo, extra_args=[
        "--tcp", "127.0.0.1:0", "--token-file", str(token_file)]).start(timeout_s=60)
    port = int(proc.ready_record()["tcp"].rsplit(":", 1)[1])
    # With a token configured the Unix socket wants hello first too.
    try:
        tcp = f"127.0.0.1:{port}"
        with Client(tcp=tcp, token="s3cret-token") as c:
            r = c.infer("identity", {"x": np.ones((1, 16), np.float32)})
            assert r["y"].sum() == 16
        with pytest.raises(errors.Unauthenticated):
            Client(tcp=tcp, token="wrong")
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        r = call(s, op="health", id=1)  # not hello first
        assert r["error"]["code"] == "UNAUTHENTICATED" and is_closed(s)
        s = connect(proc.socket_path)
        r = call(s, op="infer", id=3, model="identity", inputs={})
        assert r["error"]["code"] == "UNAUTHENTICATED" and is_closed(s)
        with Client(proc.socket_path, token="s3cret-token") as c:
            assert c.health()["ready"]
    finally:
        assert proc.stop() == 0


def test_tcp_without_token_is_refused_at_start(repo_with_demo):
    proc = ServerProcess(repo_with_demo, extra_args=["--tcp", f"127.0.0.1:{_free_port()}"])
    with pytest.raises(errors.Unavailable):
        proc.start(timeout_s=30)
    assert proc.proc.returncode == 2
    assert "token" in proc.log_tail()
    assert "Traceback" not in proc.log_tail()


def test_stop_closes_idle_connections_only_after_their_answers_are_written(short_tmp):
    """An answer finished in the same loop pass as the stop still reaches the client."""
    from appliance.config.load import load_config
    from appliance.models.manager import ModelManager
    from appliance.models.repository import Repository
    from appliance.serving.service import Service
    from appliance.transport.socket_server import Connection, SocketServer
    from engines.onnxruntime_engine import OnnxRuntimeEngine

    async def go():
        config = load_config(None, {"data_dir": str(short_tmp),
                                    "server.socket_path": str(short_tmp / "s.sock")})
        repo = Repository(short_tmp)
        service = Service(ModelManager(repo, OnnxRuntimeEngine(), config))
        server = SocketServer(service, config)
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, conn = await loop.connect_accepted_socket(
            lambda: Connection(server, needs_hello=False), ours)
        conn.send({"id": 1, "ok": True, "note": "answered just before the stop"})
        await server.stop()  # same loop pass: the answer is still in the connection's queue
        theirs.settimeout(5)
        got = recv(theirs)
        assert is_closed(theirs)
        repo.close()
        return got

    assert asyncio.run(go())["note"] == "answered just before the stop"
