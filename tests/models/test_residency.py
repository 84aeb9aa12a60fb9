"""Memory budget with LRU unloading, lazy loading, and instance scaling."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance import errors
from appliance.client import AsyncClient, Client
from appliance.demo.launcher import ServerProcess
from appliance.models.repository import Repository

WIDE = 100_000  # 400 KB of weights: a loaded version is estimated at 800 KB


def wide_add(path, c: float, width: int = WIDE):
    k = numpy_helper.from_array(np.full((width,), c, np.float32), "k")
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", width]) for n in "xy"]
    g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["y"])], "wide", [io[0]],
                          [io[1]], initializer=[k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _states(c: Client) -> dict[str, str]:
    return {m["name"]: m["versions"][0]["state"] for m in c.models()}


BIG = 1 << 22  # 16 MiB of weights: a cost well above the allocator's noise


def _measure(data_dir, names: list[str], x) -> tuple[int, dict[str, int]]:
    """Starts with no budget: the process's baseline and each model's measured cost,
    which the budgets of the tests below are made from. Measured on the second start:
    on the first, each load reuses the heap its engine's preparation freed, and reads
    low (docs/operations.md, "Memory budget")."""
    cfg = data_dir / "nobudget.toml"
    cfg.write_text("[residency]\nmemory_budget_mb = 1000000\n")
    for _ in range(2):
        with ServerProcess(data_dir, extra_args=["--config", str(cfg)]) as server, \
                Client(server.socket_path) as c:
            for name in names:
                c.infer(name, {"x": x})  # a lazy one loads now
            mem = c.stats()["memory"]
    return mem["baseline_bytes"], {v["model"]: v["memory_bytes"] for v in mem["versions"]}


def _budget_file(data_dir, nbytes: int):
    cfg = data_dir / "outpost.toml"
    cfg.write_text(f"[residency]\nmemory_budget_mb = {nbytes >> 20}\n")
    return cfg


def test_budget_unloads_the_least_recently_used_idle_version(short_tmp):
    lazy = short_tmp / "lazy.toml"
    lazy.write_text("load = 'lazy'\n")
    repo = Repository(short_tmp)
    repo.add("a", wide_add(short_tmp / "a.onnx", 1, BIG))
    repo.add("b", wide_add(short_tmp / "b.onnx", 2, BIG))
    repo.add("c", wide_add(short_tmp / "c.onnx", 3, BIG), config_path=lazy)
    repo.close()
    x = np.zeros((1, BIG), np.float32)
    baseline, cost = _measure(short_tmp, ["a", "b", "c"], x)
    assert min(cost.values()) >= BIG * 4  # at least the weights: measured, not guessed
    cfg = _budget_file(short_tmp, baseline + int(2.5 * max(cost.values())))  # two, not three
    with ServerProcess(short_tmp, extra_args=["--config", str(cfg)]) as server, \
            Client(server.socket_path) as c:
        assert _states(c) == {"a": "ready", "b": "ready", "c": "unloaded"}
        assert c.health()["ready"]  # a lazy model not loaded yet is not "not ready"
        c.infer("a", {"x": x})
        c.infer("b", {"x": x})  # a is now the least recently used
        r = c.infer("c", {"x": x})  # waits for c's load, which unloads a
        assert r["y"][0, 0] == 3.0
        assert _states(c) == {"a": "unloaded", "b": "ready", "c": "ready"}
        r = c.infer("a", {"x": x})  # a comes back; b is now the oldest
        assert r["y"][0, 0] == 1.0
        assert _states(c) == {"a": "ready", "b": "unloaded", "c": "ready"}
        mem = c.stats()["memory"]
        assert mem["accounted_bytes"] <= mem["budget_bytes"]
        rows = {v["model"]: v for v in mem["versions"]}
        assert rows["a"]["evictions"] == 1 and not rows["a"]["evicted"]
        assert rows["b"]["evictions"] == 1 and rows["b"]["evicted"]
        assert rows["b"]["eviction_reason"].startswith("memory budget: made room for a:1, "
                                                        "which needs ")
        assert rows["b"]["last_measured_bytes"] > BIG * 4
        assert rows["b"]["memory_bytes"] == 0 and rows["c"]["memory_bytes"] > BIG * 4


def test_lazy_load_bounded_by_the_request_timeout(short_tmp):
    from tests.support.slow_model import slow_model

    lazy = short_tmp / "lazy.toml"
    lazy.write_text("load = 'lazy'\n")
    Repository(short_tmp).add("slow", slow_model(short_tmp / "s.onnx", layers=6),
                              config_path=lazy)
    x = np.ones((1, 3, 64, 64), np.float32)
    with ServerProcess(short_tmp) as server, Client(server.socket_path) as c:
        assert _states(c) == {"slow": "unloaded"}
        with pytest.raises(errors.DeadlineExceeded, match="loading"):
            c.infer("slow", {"x": x}, timeout_ms=1)
        r = c.infer("slow", {"x": x}, timeout_ms=60_000)
        assert r["y"].shape == (1, 64)


def test_instances_scale_up_with_queue_depth_and_back_down(short_tmp):
    from tests.support.slow_model import slow_model

    cfg = short_tmp / "c.toml"
    cfg.write_text("max_batch_size = 2\ninstances = 1\nmax_instances = 3\n"
                   "scale_down_idle_s = 0.5\n")
    Repository(short_tmp).add("slow", slow_model(short_tmp / "s.onnx"), config_path=cfg)
    x = np.ones((1, 3, 64, 64), np.float32)
    with ServerProcess(short_tmp) as server:
        async def load():
            async with await AsyncClient.connect(server.socket_path) as c:
                peak = 1
                t_end = time.monotonic() + 3
                while time.monotonic() < t_end:
                    await asyncio.gather(*(c.infer("slow", {"x": x}) for _ in range(16)))
                    st = await c.stats("slow")
                    peak = max(peak, st["models"][0]["instances"])
                return peak
        peak = asyncio.run(load())
        assert peak > 1
        deadline = time.monotonic() + 10
        with Client(server.socket_path) as c:
            while time.monotonic() < deadline:
                if c.stats("slow")["models"][0]["instances"] == 1:
                    break
                time.sleep(0.2)
            assert c.stats("slow")["models"][0]["instances"] == 1
            assert c.infer("slow", {"x": x})["y"].shape == (1, 64)


def test_probes_and_metadata_describe_a_lazy_model_without_loading_it(short_tmp):
    """As in Triton, a model not loaded is not ready; asking must not load it (a probe
    every few seconds would otherwise keep a lazy or evicted model resident)."""
    import json
    import urllib.error
    import urllib.request

    from tests.support.http_server import http_url

    lazy = short_tmp / "lazy.toml"
    lazy.write_text("load = 'lazy'\n")
    Repository(short_tmp).add("c", wide_add(short_tmp / "c.onnx", 3), config_path=lazy)
    x = np.zeros((1, WIDE), np.float32)

    def status(url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with ServerProcess(short_tmp, extra_args=["--http", "127.0.0.1:0"]) as server, \
            Client(server.socket_path) as c:
        base = http_url(server)
        for _ in range(3):
            assert status(f"{base}/v2/models/c/ready") == 400
            assert status(f"{base}/v2/models/c/versions/1/ready") == 400
            with urllib.request.urlopen(f"{base}/v2/models/c", timeout=30) as resp:
                meta = json.loads(resp.read())
            assert meta["inputs"][0]["name"] == "x" and meta["versions"] == ["1"]
            assert status(f"{base}/v2/models/c/config") == 200
            md = c.metadata("c")
            assert md["inputs"][0]["shape"] == [-1, WIDE]
        time.sleep(0.5)  # a load, had one started, would be under way by now
        assert _states(c) == {"c": "unloaded"}
        assert status(f"{base}/v2/models/d/ready") == 404
        assert c.infer("c", {"x": x})["y"][0, 0] == 3.0  # a request does load it
        assert _states(c) == {"c": "ready"}
        assert status(f"{base}/v2/models/c/ready") == 200


def test_an_active_model_evicted_at_start_is_still_ready(short_tmp):
    """Readiness means "will answer": a version the budget evicted loads on demand."""
    repo = Repository(short_tmp)
    repo.add("a", wide_add(short_tmp / "a.onnx", 1, BIG))
    repo.add("b", wide_add(short_tmp / "b.onnx", 2, BIG))
    repo.close()
    x = np.zeros((1, BIG), np.float32)
    baseline, cost = _measure(short_tmp, ["a", "b"], x)
    cfg = _budget_file(short_tmp, baseline + int(1.5 * max(cost.values())))  # one, not both
    with ServerProcess(short_tmp, extra_args=["--config", str(cfg)]) as server, \
            Client(server.socket_path) as c:
        assert _states(c) == {"a": "unloaded", "b": "ready"}
        assert c.health()["ready"]
        assert server.ready_record()["ready"] is True
        assert c.infer("a", {"x": x})["y"][0, 0] == 1.0  # it does answer


def test_a_model_that_cannot_fit_the_budget_at_all_stops_the_start(short_tmp):
    Repository(short_tmp).add("a", wide_add(short_tmp / "a.onnx", 1, BIG))
    baseline, cost = _measure(short_tmp, ["a"], np.zeros((1, BIG), np.float32))
    cfg = _budget_file(short_tmp, baseline + cost["a"] // 2)
    server = ServerProcess(short_tmp, extra_args=["--config", str(cfg)])
    with pytest.raises(errors.Unavailable, match="exited with 2") as info:
        server.start()
    text = str(info.value)
    assert "config error: residency.memory_budget_mb: model 'a' version 1 costs" in text
    assert "measured: 1 instance(s)" in text and "raise the budget to at least" in text
    assert "Traceback" not in text


def test_a_budget_below_the_process_itself_stops_the_start(short_tmp):
    Repository(short_tmp).add("a", wide_add(short_tmp / "a.onnx", 1))
    cfg = _budget_file(short_tmp, 5 << 20)  # the 5 MiB: less than Python itself
    server = ServerProcess(short_tmp, extra_args=["--config", str(cfg)])
    with pytest.raises(errors.Unavailable, match="exited with 2") as info:
        server.start()
    assert "before any model loads but residency.memory_budget_mb is 5" in str(info.value)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_budget_of_zero_or_less_is_refused(short_tmp, value):
    import subprocess
    import sys

    cfg = short_tmp / "outpost.toml"
    cfg.write_text(f"[residency]\nmemory_budget_mb = {value}\n")
    r = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--config",
                        str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "residency.memory_budget_mb" in r.stderr and "positive number of MiB" in r.stderr
    assert "leave the key out for the firmware profile's default" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_scale_up_that_would_pass_the_budget_is_refused(short_tmp):
    from tests.support.slow_model import slow_model

    cfg = short_tmp / "c.toml"
    cfg.write_text("max_batch_size = 2\ninstances = 1\nmax_instances = 3\n")
    Repository(short_tmp).add("slow", slow_model(short_tmp / "s.onnx"), config_path=cfg)
    x = np.ones((1, 3, 64, 64), np.float32)
    baseline, cost = _measure(short_tmp, ["slow"], x)
    budget = _budget_file(short_tmp, baseline + cost["slow"] + (cost["slow"] >> 1))
    with ServerProcess(short_tmp, extra_args=["--config", str(budget)]) as server:
        async def load():
            async with await AsyncClient.connect(server.socket_path) as c:
                for _ in range(6):
                    await asyncio.gather(*(c.infer("slow", {"x": x}) for _ in range(16)))
                return (await c.stats("slow"))
        st = asyncio.run(load())
        assert st["models"][0]["instances"] == 1
        assert "scale-up refused" in server.log_path.read_text()
        assert st["memory"]["accounted_bytes"] <= st["memory"]["budget_bytes"]
