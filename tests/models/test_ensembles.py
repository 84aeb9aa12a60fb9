"""Ensembles: pipelines and combiners served like models; bad ones refused at load."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from appliance import errors
from appliance.client import Client
from appliance.config.load import load_config
from appliance.demo.launcher import ServerProcess
from appliance.models.ensemble import combine
from appliance.models.manager import ModelManager
from appliance.models.repository import Repository
from appliance.models.versions import VersionState
from appliance.scheduling.request import QueuedRequest
from engines.onnxruntime_engine import OnnxRuntimeEngine
from tests.support import tiny_models as tm

PIPELINE = """
[ensemble]
kind = "pipeline"
[[ensemble.steps]]
model = "add"
inputs = { x = "pixels" }
outputs = { y = "shifted" }
[[ensemble.steps]]
model = "head_a"
inputs = { y = "shifted" }
"""

COMBINE = """
[ensemble]
kind = "combine"
combiner = "{combiner}"
[[ensemble.members]]
model = "head_a"
weight = 1.0
[[ensemble.members]]
model = "head_b"
weight = 3.0
[[ensemble.members]]
model = "head_c"
weight = 1.0
"""


@pytest.fixture
def members(short_tmp):
    repo = Repository(short_tmp)
    repo.add("add", tm.add_const(short_tmp / "add.onnx", 1.0))
    for i, name in enumerate(("head_a", "head_b", "head_c")):
        repo.add(name, tm.head(short_tmp / f"{name}.onnx", seed=i))
    return repo


def _ensemble(repo, folder, name, text):
    path = folder / f"{name}.toml"
    path.write_text(text)
    return repo.add(name, path)


def test_combine_reference():
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32)
    b = np.array([[0.1, 0.6, 0.3], [0.2, 0.1, 0.7]], np.float32)
    c = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], np.float32)
    np.testing.assert_allclose(combine("mean", [a, b, c], [1, 1, 1]), (a + b + c) / 3,
                               rtol=1e-6)
    np.testing.assert_allclose(combine("weighted_mean", [a, b, c], [1, 3, 1]),
                               (a + 3 * b + c) / 5, rtol=1e-6)
    # Row 0: votes 0, 1, 1 -> 1. Row 1: votes 1, 2, 0 with weights 1, 3, 1 -> 2.
    assert combine("majority_vote", [a, b, c], [1, 3, 1]).tolist() == [1, 2]
    assert combine("majority_vote", [a, b, c], [1, 1, 1]).tolist() == [1, 0]  # tie: lowest


def test_pipeline_and_combiners_serve_like_models(members, short_tmp):
    _ensemble(members, short_tmp, "pipe", PIPELINE)
    for combiner in ("mean", "weighted_mean", "majority_vote"):
        _ensemble(members, short_tmp, f"vote_{combiner}", COMBINE.format(combiner=combiner))
    members.close()
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    heads = [tm.softmax((x + 1) @ tm.head_weights(i)) for i in range(3)]
    heads_raw = [tm.softmax(x @ tm.head_weights(i)) for i in range(3)]
    with ServerProcess(short_tmp) as server, Client(server.socket_path) as c:
        meta = c.metadata("pipe")
        assert meta["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [-1, 16]}]
        assert meta["outputs"] == [{"name": "probs", "dtype": "float32", "shape": [-1, 4]}]
        r = c.infer("pipe", {"pixels": x})
        assert r.model == "pipe" and r.version == 1
        np.testing.assert_allclose(r["probs"], heads[0], rtol=1e-5, atol=1e-6)

        r = c.infer("vote_mean", {"y": x})
        np.testing.assert_allclose(r["probs"], sum(heads_raw) / 3, rtol=1e-5, atol=1e-6)
        r = c.infer("vote_weighted_mean", {"y": x})
        np.testing.assert_allclose(r["probs"], (heads_raw[0] + 3 * heads_raw[1] +
                                                heads_raw[2]) / 5, rtol=1e-5, atol=1e-6)
        r = c.infer("vote_majority_vote", {"y": x})
        assert r["probs"].dtype == np.int64 and r["probs"].shape == (5,)
        np.testing.assert_array_equal(r["probs"], combine("majority_vote", heads_raw,
                                                          [1, 3, 1]))
        models = {m["name"]: m for m in c.models()}
        assert models["pipe"]["versions"][0]["engine"] == "ensemble"
        with pytest.raises(errors.InvalidArgument, match="pixels"):
            c.infer("pipe", {"x": x})
        st = {row["model"]: row for row in c.stats()["models"]}
        assert st["pipe"]["request_success"] == 1
        assert st["add"]["request_success"] == 1  # the member ran the step


def test_a_lazy_ensembles_first_requests_are_checked_once_it_has_loaded(members, short_tmp):
    """Its inputs are known only once its members are: the requests that come while it
    loads are held unchecked and checked as they are released, good and bad alike."""
    _ensemble(members, short_tmp, "pipe", 'load = "lazy"\n' + PIPELINE)
    members.close()
    x = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)

    async def first_requests(path):
        from appliance.client import AsyncClient

        async with await AsyncClient.connect(path) as c:
            return await asyncio.gather(c.infer("pipe", {"pixels": x}),
                                        c.infer("pipe", {"wrong": x}),
                                        return_exceptions=True)

    with ServerProcess(short_tmp) as server:
        with Client(server.socket_path) as c:
            assert "pipe" not in {r["model"] for r in c.stats()["models"]}  # not loaded
        good, bad = asyncio.run(first_requests(server.socket_path))
        assert not isinstance(good, Exception), good
        np.testing.assert_allclose(good["probs"], tm.softmax((x + 1) @ tm.head_weights(0)),
                                   rtol=1e-5, atol=1e-6)
        assert isinstance(bad, errors.InvalidArgument) and "pixels" in bad.message
        with Client(server.socket_path) as c:
            row = next(r for r in c.stats()["models"] if r["model"] == "pipe")
        assert (row["request_success"], row["request_failure"]) == (1, 1)


@pytest.mark.parametrize("text,words", [
    (PIPELINE.replace('model = "head_a"', 'model = "ghost"'), ("ghost", "not in the repo")),
    (PIPELINE.replace('inputs = { y = "shifted" }', 'inputs = { z = "shifted" }'),
     ("'z'", "step 2")),
    (PIPELINE.replace('outputs = { y = "shifted" }', 'outputs = { y = "other" }'),
     ("shifted",)),
    (COMBINE.format(combiner="mean").replace('model = "head_c"', 'model = "add"'),
     ("'add'",)),
])
def test_bad_ensembles_are_refused_at_load_naming_the_problem(members, short_tmp, text,
                                                              words):
    _ensemble(members, short_tmp, "bad", text)
    members.close()
    with ServerProcess(short_tmp) as server, Client(server.socket_path) as c:
        assert c.health()["ready"] is False  # the ensemble failed to load
        with pytest.raises(errors.OutpostError) as e:
            c.infer("bad", {"pixels": np.zeros((1, 16), np.float32)})
        for w in words:
            assert w in str(e.value), str(e.value)
        # The members are served all the same.
        assert c.infer("add", {"x": np.zeros((1, 16), np.float32)})["y"][0, 0] == 1.0


def test_ensemble_config_is_checked_when_added(members, short_tmp):
    bad = short_tmp / "e.toml"
    bad.write_text("[ensemble]\nkind = 'combine'\ncombiner = 'median'\n"
                   "[[ensemble.members]]\nmodel = 'a'\n[[ensemble.members]]\nmodel = 'b'\n")
    with pytest.raises(errors.ConfigError, match="median"):
        members.add("e", bad)
    bad.write_text("max_batch_size = 4\n")
    with pytest.raises(errors.InvalidArgument, match=r"\[ensemble\]"):
        members.add("e", bad)


def test_an_ensemble_that_is_loading_holds_a_bounded_queue_with_deadlines(members,
                                                                            short_tmp):
    """Requests that come while an ensemble loads wait as a model's do: at most its
    dynamic_batching.max_queue_size of them (then RESOURCE_EXHAUSTED), each until its
    deadline (then DEADLINE_EXCEEDED naming the loading); the rest run once it is loaded.
    Its load is held at a gate on its members' loading: a member slow to load."""
    _ensemble(members, short_tmp, "pipe",
              'load = "lazy"\n[dynamic_batching]\nmax_queue_size = 2\n' + PIPELINE)
    members.close()
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)

    async def go():
        repo = Repository(short_tmp)
        manager = ModelManager(repo, OnnxRuntimeEngine(),
                               load_config(None, {"data_dir": str(short_tmp)}))
        await manager.load_all()  # the members; the lazy ensemble waits for a request
        loaded, gate = manager.ensure_loaded, asyncio.Event()

        async def slow_member_load(name, version):
            await gate.wait()
            return await loaded(name, version)
        manager.ensure_loaded = slow_member_load
        try:
            ens = manager.lookup("pipe", 1)  # starts its load
            loop = asyncio.get_running_loop()
            kept, expiring = loop.create_future(), loop.create_future()

            def request(fut, deadline):  # its inputs are known once it has loaded
                return QueuedRequest({"pixels": x}, 2, (), 0, deadline,
                                     lambda out, err: fut.set_result((out, err)))
            t0 = time.monotonic()
            ens.submit(request(kept, None))
            ens.submit(request(expiring, t0 + 0.05))
            with pytest.raises(errors.ResourceExhausted, match="is loading and 2 requests"):
                ens.submit(request(loop.create_future(), None))
            await asyncio.sleep(0)
            held = (ens.state, ens.inflight_count(), expiring.done())
            _, expired = await asyncio.wait_for(expiring, 5)
            waited = time.monotonic() - t0
            still = (ens.state, ens.inflight_count(), kept.done())
            gate.set()
            outputs, error = await asyncio.wait_for(kept, 30)
            return held, expired, waited, still, outputs, error, ens.stats
        finally:
            gate.set()
            await manager.unload_all()
            repo.close()

    held, expired, waited, still, outputs, error, stats = asyncio.run(go())
    assert held == (VersionState.LOADING, 2, False)
    assert isinstance(expired, errors.DeadlineExceeded)
    assert "while ensemble 'pipe' version 1 was loading" in str(expired)
    assert waited >= 0.045  # at its deadline, not before (the loop's timer resolution)
    assert still == (VersionState.LOADING, 1, False)
    assert error is None
    np.testing.assert_allclose(outputs["probs"], tm.softmax((x + 1) @ tm.head_weights(0)),
                               rtol=1e-5, atol=1e-6)
    assert stats.failures_by_code == {"RESOURCE_EXHAUSTED": 1, "DEADLINE_EXCEEDED": 1}
    assert stats.request_success == 1
