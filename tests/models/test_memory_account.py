"""The memory budget's account is measured bytes: a model's arena at its largest batch,
per instance, beside the process's RSS; the same figures in stats, /metrics and
`outpost models list`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from appliance.client import AsyncClient, Client
from appliance.demo.launcher import ServerProcess
from appliance.models.repository import Repository
from tests.support.http_server import http_url

ROW_BYTES = 4 << 20  # the intermediate: 4 MiB a row
MAX_BATCH = 8  # 32 MiB at the largest batch


def wide_intermediate(path):
    """(n, 64) -> Tile to (n, 1Mi floats) -> Relu -> mean: (n, 1); nothing to its weights."""
    reps = numpy_helper.from_array(np.array([1, ROW_BYTES // 4 // 64], np.int64), "reps")
    nodes = [helper.make_node("Tile", ["x", "reps"], ["t"]),
             helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[1], keepdims=1)]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 64])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", 1])], initializer=[reps])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_measured_bytes_in_stats_metrics_and_models_list(short_tmp):
    cfg = short_tmp / "m.toml"
    cfg.write_text(f"max_batch_size = {MAX_BATCH}\ninstances = 1\n")
    Repository(short_tmp).add("w", wide_intermediate(short_tmp / "w.onnx"), config_path=cfg)
    conf = short_tmp / "outpost.toml"
    conf.write_text("[residency]\nmemory_budget_mb = 4096\n[warmup]\nbudget_ms = 2000\n")
    x = np.ones((1, 64), np.float32)
    with ServerProcess(short_tmp, extra_args=["--config", str(conf), "--http",
                                              "127.0.0.1:0"]) as server:
        with Client(server.socket_path) as c:
            mem = c.stats()["memory"]
        row = next(v for v in mem["versions"] if v["model"] == "w")
        # warm-up ran the largest batch: its intermediate is in the measure
        assert row["memory_bytes"] >= ROW_BYTES * MAX_BATCH
        assert row["instances"] == 1 and row["instance_bytes"] == row["memory_bytes"]
        assert mem["accounted_bytes"] == mem["baseline_bytes"] + row["memory_bytes"]
        assert mem["budget_bytes"] == 4096 << 20

        async def bursts():  # batches of the largest size
            async with await AsyncClient.connect(server.socket_path) as c:
                for _ in range(20):
                    await asyncio.gather(*(c.infer("w", {"x": x}) for _ in range(MAX_BATCH)))
        asyncio.run(bursts())
        # the account holds what the process holds: under load RSS stays within the
        # listeners' and requests' share of it (the issue: 226 MiB against 5 accounted)
        rss = _rss(server.pid)
        assert rss < mem["accounted_bytes"] + (48 << 20), (rss >> 20, mem)

        with urllib.request.urlopen(f"{http_url(server)}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        labels = (("model", "w"), ("version", "1"))
        assert samples[("outpost_model_memory_bytes", labels)] == row["memory_bytes"]
        assert samples[("outpost_model_instances", labels)] == 1
        assert samples[("outpost_model_evictions_total", labels)] == 0
        assert samples[("outpost_memory_budget_bytes", ())] == 4096 << 20

        r = subprocess.run([sys.executable, "-m", "appliance", "models", "list", "--data-dir",
                            str(short_tmp), "--socket", str(server.socket_path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (f"serving: version 1 ready, 1 instance(s), "
                f"{row['memory_bytes'] / (1 << 20):.1f} MiB measured") in r.stdout
        assert "MiB budget accounted" in r.stdout
