"""Canary/A-B splits, sticky routing and shadow versions, through the real server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from appliance import errors
from appliance.client import AsyncClient, Client
from appliance.demo.launcher import ServerProcess
from appliance.models.repository import Repository
from appliance.models.traffic import TrafficPolicy, Variant
from appliance.serving.router import (
    BUSY_COPY_EVERY,
    answers_agree,
    is_distribution,
    key_unit,
    pick,
    shed_copy,
)
from tests.support import tiny_models as tm

X = np.zeros((1, 16), np.float32)


def test_pick_is_a_pure_function_of_policy_and_key():
    import random

    p = TrafficPolicy((Variant(1, 0.9), Variant(2, 0.1)), sticky=True)
    keys = [f"device-{i}" for i in range(2000)]
    first = [pick(p, k, random.Random(0)) for k in keys]
    assert first == [pick(p, k, random.Random(99)) for k in keys]  # the rng plays no part
    share = first.count(2) / len(keys)
    assert 0.07 < share < 0.13
    assert all((v == 2) == (key_unit(k) >= 0.9) for k, v in zip(keys, first))


@pytest.mark.parametrize("policy,words", [
    ({"split": [{"version": 1, "fraction": 0.5}, {"version": 2, "fraction": 0.4}]},
     ("adds up to 0.9",)),
    ({"split": [{"version": 1, "fraction": 1.5}]}, ("(0, 1]",)),
    ({"split": [{"version": 1, "fraction": 0.5}, {"version": 1, "fraction": 0.5}]},
     ("twice",)),
    ({"split": [{"version": 1, "fraction": 1.0}], "shadow": 1}, ("both",)),
    ({"split": [{"version": "1", "fraction": 1.0}]}, ("integer 'version'",)),
    ({"splitt": []}, ("unknown traffic field",)),
    ({"shadow": 2, "shadow_sample": 0}, ("shadow_sample 0 must be a share in (0, 1]",)),
    ({"shadow": 2, "shadow_sample": "all"}, ("'shadow_sample' must be a number",)),
])
def test_bad_policies_are_refused(policy, words):
    with pytest.raises(errors.InvalidArgument) as e:
        TrafficPolicy.from_dict(policy, "m")
    for w in words:
        assert w in str(e.value)


@pytest.fixture
def versions(short_tmp):
    repo = Repository(short_tmp)
    repo.add("m", tm.add_const(short_tmp / "v1.onnx", 1.0))
    repo.add("m", tm.add_const(short_tmp / "v2.onnx", 2.0), activate=False)
    repo.add("m", tm.failing_on_large(short_tmp / "v3.onnx"), activate=False)
    repo.add("m", tm.wrong_width(short_tmp / "v4.onnx"), activate=False)
    repo.add("m", tm.add_const(short_tmp / "v5.onnx", 5.0), activate=False)
    repo.close()
    return short_tmp


def test_canary_split_random_and_sticky(versions):
    with ServerProcess(versions) as server, Client(server.socket_path) as c:
        policy = {"split": [{"version": 1, "fraction": 0.75}, {"version": 2, "fraction": 0.25}]}
        r = c.call("traffic", model="m", policy=policy)
        assert r["traffic"]["split"][1] == {"version": 2, "fraction": 0.25}
        got = [c.infer("m", {"x": X}) for _ in range(400)]
        for res in got:
            assert res["y"][0, 0] == res.version  # each answer from the version it names
        share = sum(res.version == 2 for res in got) / len(got)
        assert 0.17 < share < 0.33, share
        with pytest.raises(errors.InvalidArgument, match="adds up"):
            c.call("traffic", model="m", policy={"split": [{"version": 1, "fraction": 0.7}]})
        with pytest.raises(errors.NotFound):
            c.call("traffic", model="m", policy={"split": [{"version": 9, "fraction": 1.0}]})

        c.call("traffic", model="m", policy={**policy, "sticky": True})
        for key in ("cam-1", "cam-2", "cam-3", "kiosk-9"):
            versions_seen = {c.call("infer", model="m", routing_key=key,
                                    inputs={"x": _t(X)})["version"] for _ in range(10)}
            assert len(versions_seen) == 1
        st = c.stats("m")
        assert sum(st["traffic"]["m"]["routed"].values()) == 40
        assert {row["version"] for row in st["models"]} == {1, 2}  # per-variant figures

        c.call("traffic", model="m", clear=True)
        assert {c.infer("m", {"x": X}).version for _ in range(20)} == {1}
    # A run-time policy persists across restarts until cleared.
    with ServerProcess(versions) as server, Client(server.socket_path) as c:
        assert c.call("traffic", model="m")["traffic"] is None


def _t(a):
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def test_shadow_compares_and_never_touches_live_answers(versions):
    with ServerProcess(versions) as server, Client(server.socket_path) as c:
        c.call("traffic", model="m", policy={"shadow": 2})
        for i in range(30):
            r = c.infer("m", {"x": np.full((1, 16), i, np.float32)})
            assert r.version == 1 and r["y"][0, 0] == i + 1
        time.sleep(0.3)
        sh = c.stats("m")["traffic"]["m"]["shadow"]
        assert sh["compared"] == 30 and sh["errors"] == {}
        assert sh["max_abs_diff"] == pytest.approx(1.0)
        assert sh["top1_agreement"] == 1.0  # adding a constant keeps every argmax
        assert sh["latency_ms"]["p50"] > 0

        for shadow, expect in ((3, "INTERNAL"), (4, "shape_mismatch")):
            c.call("traffic", model="m", policy={"shadow": shadow})
            big = np.full((1, 16), 100, np.float32)  # v3 fails on it; v4 is the wrong width
            for _ in range(10):
                r = c.infer("m", {"x": big})
                assert r.version == 1 and r["y"][0, 0] == 101.0
            time.sleep(0.3)
            sh = c.stats("m")["traffic"]["m"]["shadow"]
            assert sh["errors"].get(expect) == 10, sh
            assert sh["compared"] == 0


def test_a_hanging_shadow_does_not_hold_live_latency(short_tmp):
    """The shadow is a slow model that can't keep up: its copies time out or are dropped,
    and the live answers keep their own latency."""
    from tests.support.slow_model import slow_model

    repo = Repository(short_tmp)
    fast = short_tmp / "fast.onnx"
    # Live: a cheap model with the slow model's input; shadow: the slow model.
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Tile", ["f", "reps"], ["y"])], "fast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 63])],
        initializer=[onnx.numpy_helper.from_array(np.array([1, 21], np.int64), "reps")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(fast))
    cfg = short_tmp / "c.toml"
    cfg.write_text("max_batch_size = 1\n[dynamic_batching]\nmax_queue_size = 2\n")
    repo.add("m", fast)
    repo.add("m", slow_model(short_tmp / "slow.onnx", layers=4), config_path=cfg,
             activate=False)
    repo.close()
    x = np.ones((1, 3, 64, 64), np.float32)
    with ServerProcess(short_tmp) as server:
        async def go():
            async with await AsyncClient.connect(server.socket_path) as c:
                async def burst():
                    t0 = time.perf_counter()
                    await asyncio.gather(*(c.infer("m", {"x": x}) for _ in range(40)))
                    return time.perf_counter() - t0
                base = min([await burst() for _ in range(3)])
                await c.call("traffic", model="m", policy={"shadow": 2,
                                                           "shadow_timeout_ms": 50})
                shadowed = min([await burst() for _ in range(3)])
                await asyncio.sleep(0.5)
                st = await c.stats("m")
                return base, shadowed, st["traffic"]["m"]["shadow"]

        base, shadowed, sh = asyncio.run(go())
    # The shadow ran some copies, and shed, dropped or timed out the rest.
    assert sh["dropped"] + sum(sh["errors"].values()) > 0, sh
    assert 0 < sh["shed"] <= sh["dropped"], sh  # live first: copies shed under load
    assert sh["dropped"] + sum(sh["errors"].values()) + sh["compared"] == 120
    # The live path shares the CPU with the shadow's work but never waits on it.
    assert shadowed < base + 2.0, (base, shadowed)


def test_http_admin_and_metrics_for_traffic(versions):
    import json
    import urllib.error
    import urllib.request

    cfg = versions / "outpost.toml"
    cfg.write_text('[http]\naddress = "127.0.0.1:0"\nadmin_token = "adm"\n')
    with ServerProcess(versions, extra_args=["--config", str(cfg)]) as server:
        base = server.ready_record()["http"]

        def post(path, body, token="adm"):
            req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")

        assert post("/v2/repository/models/m/activate", {"version": 2})["previous"] == 1
        with pytest.raises(urllib.error.HTTPError) as e:
            post("/v2/repository/models/m/activate", {"version": 1}, token="nope")
        assert e.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as e:
            post("/v2/repository/models/m/traffic",
                 {"policy": {"split": [{"version": 2, "fraction": 0.5}]}})
        assert e.value.code == 400 and b"adds up" in e.value.read()
        r = post("/v2/repository/models/m/traffic", {"policy": {"shadow": 5}})
        assert r["traffic"]["shadow"] == 5
        with Client(server.socket_path) as c:
            for _ in range(6):
                assert c.infer("m", {"x": X}).version == 2
        time.sleep(0.3)
        with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
        assert 'outpost_routed_requests_total{model="m",version="2"} 6.0' in text
        assert 'outpost_shadow_compared_total{model="m"} 6.0' in text
        assert 'outpost_shadow_max_abs_diff{model="m"} 3.0' in text
        assert 'outpost_shadow_agreed_total{model="m"} 0.0' in text  # 3.0 apart: none
        assert 'outpost_shadow_shed_total{model="m"} 0.0' in text  # one at a time: none
        assert 'outpost_shadow_sampled_out_total{model="m"} 0.0' in text  # sample 1.0


def test_agreement_is_the_top_class_for_distributions_else_the_tolerance():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    assert is_distribution(probs) and not is_distribution(probs * 2)
    assert not is_distribution(np.ones((2, 1), np.float32))  # one class: no top class
    other = np.array([[0.5, 0.3, 0.2], [0.3, 0.1, 0.6]], np.float32)
    assert answers_agree(probs, other, 1e-3, 1e-4)  # same top classes
    flipped = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], np.float32)
    assert not answers_agree(probs, flipped, 1e-3, 1e-4)
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    assert answers_agree(x, x + 1e-5, 1e-3, 1e-4)
    assert not answers_agree(x, x + 1, 1e-3, 1e-4)  # argmax kept, values not: disagrees
    assert not answers_agree(x, np.full_like(x, np.nan), 1e-3, 1e-4)


def test_shadow_copies_are_shed_while_live_traffic_needs_the_device():
    idle = {"live_waiting_rows": 0, "shadow_inflight": 0, "shadow_capacity": 8}
    assert not shed_copy(**idle, busy_seen=0)
    assert shed_copy(**{**idle, "shadow_inflight": 8}, busy_seen=0)  # the shadow is full
    # While live requests wait, one copy in BUSY_COPY_EVERY goes.
    sent = [not shed_copy(**{**idle, "live_waiting_rows": 3}, busy_seen=n)
            for n in range(1, 10 * BUSY_COPY_EVERY + 1)]
    assert sum(sent) == 10


def test_shadow_sample_bounds_the_copies_and_agreement_is_counted(versions):
    with ServerProcess(versions) as server, Client(server.socket_path) as c:
        c.call("traffic", model="m", policy={"shadow": 2, "shadow_sample": 0.25})
        assert c.call("traffic", model="m")["traffic"]["shadow_sample"] == 0.25
        for i in range(200):
            assert c.infer("m", {"x": np.full((1, 16), i, np.float32)}).version == 1
        time.sleep(0.3)
        sh = c.stats("m")["traffic"]["m"]["shadow"]
    assert sh["compared"] + sh["sampled_out"] + sh["dropped"] == 200, sh
    assert 110 <= sh["sampled_out"] <= 190, sh  # about 3 in 4 not copied
    assert sh["agreed"] == 0  # v2 adds 2 where v1 adds 1: outside the tolerance
    assert sh["live_latency_ms"]["p50"] > 0 and sh["latency_ms"]["p50"] > 0
