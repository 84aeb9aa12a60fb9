"""Warm-up to steady state in the real server: every batch size, logged, bounded."""

from __future__ import annotations

import json

import numpy as np

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from appliance.models.repository import Repository
from tests.models.test_residency import wide_add


def _log_records(server: ServerProcess, msg: str) -> list[dict]:
    out = []
    for line in server.log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == msg:
            out.append(rec)
    return out


def test_each_instance_warms_every_batch_size_the_batcher_forms(short_tmp):
    cfg = short_tmp / "m.toml"
    cfg.write_text("max_batch_size = 8\ninstances = 2\n"
                   "[dynamic_batching]\npreferred_batch_sizes = [4]\n")
    Repository(short_tmp).add("a", wide_add(short_tmp / "a.onnx", 1), config_path=cfg)
    conf = short_tmp / "outpost.toml"
    conf.write_text("[warmup]\nbudget_ms = 3000\n")
    with ServerProcess(short_tmp, extra_args=["--config", str(conf)]) as server, \
            Client(server.socket_path) as c:
        # the request the load sent itself through the version's path is not counted
        st = c.stats("a")["models"][0]
        assert st["request_success"] == 0 and st["execution_count"] == 0
        assert c.infer("a", {"x": np.zeros((1, 100_000), np.float32)})["y"][0, 0] == 1.0
        assert c.stats("a")["models"][0]["request_success"] == 1
        warm = _log_records(server, "instance warm") + _log_records(
            server, "warm-up did not settle within its budget; serving anyway")
    assert sorted(r["instance"] for r in warm) == [0, 1]
    for r in warm:
        assert [b["batch"] for b in r["batches"]] == [8, 4, 1]
        assert all(b["runs"] >= 2 for b in r["batches"])
        assert r["budget_s"] == 3.0


def test_a_warm_up_over_its_budget_is_logged_and_the_model_ready_anyway(short_tmp):
    cfg = short_tmp / "m.toml"
    cfg.write_text("max_batch_size = 8\n")
    Repository(short_tmp).add("a", wide_add(short_tmp / "a.onnx", 1), config_path=cfg)
    conf = short_tmp / "outpost.toml"
    conf.write_text("[warmup]\nbudget_ms = 1\n")  # 1 ms: not enough to settle past 2 runs
    with ServerProcess(short_tmp, extra_args=["--config", str(conf)]) as server, \
            Client(server.socket_path) as c:
        assert c.health()["ready"]
        records = (_log_records(server, "instance warm")
                   + _log_records(server, "warm-up did not settle within its budget; "
                                          "serving anyway"))
    assert len(records) == 1
    for b in records[0]["batches"]:
        # bounded: a size that has not settled after its two runs stops there
        assert b["runs"] <= 2 or b["settled"]
