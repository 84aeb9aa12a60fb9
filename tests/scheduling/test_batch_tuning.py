"""The preferred batch size measured at load (dynamic_batching.auto_preferred_batch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.client import Client
from appliance.errors import ConfigError
from appliance.models.repository import Repository
from appliance.scheduling.batch_tuning import candidate_sizes, choose, measure, preferred_batch_size
from engines.base import Session, TensorSpec
from engines.errors import RunError


class Clock:
    """Time that passes only when the stand-in engine runs: the measuring is exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostedSession(Session):
    """An engine whose batch of n rows takes ``per_call_s + n * per_row_s`` on ``clock``."""

    def __init__(self, clock: Clock, per_call_s: float, per_row_s: float,
                 fails_over: int | None = None, shape=(3, 8)):
        self.clock = clock
        self.per_call_s, self.per_row_s = per_call_s, per_row_s
        self.fails_over = fails_over
        self.inputs = (TensorSpec("x", "float32", (-1, *shape)),)
        self.outputs = (TensorSpec("y", "float32", (-1, *shape)),)
        self.max_batch_size = 32
        self.calls: list[int] = []

    def run(self, feeds):
        x = feeds["x"]
        assert x.dtype == np.float32 and x.shape[1:] == self.inputs[0].shape[1:]
        n = len(x)
        if self.fails_over is not None and n > self.fails_over:
            raise RunError(f"out of device memory at batch {n}")
        self.calls.append(n)
        self.clock.now += self.per_call_s + n * self.per_row_s
        return {"y": x}


def test_candidate_sizes_double_up_to_the_limit():
    assert candidate_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert candidate_sizes(12) == [1, 2, 4, 8, 12]
    assert candidate_sizes(1) == [1]


def test_the_smallest_size_within_the_tolerance_of_the_best_wins():
    assert choose({1: 100.0, 2: 180.0, 4: 200.0, 8: 205.0}) == 4
    assert choose({1: 196.0, 2: 189.0, 16: 185.0, 32: 205.0}) == 1  # flat: no batching
    assert choose({1: 10.0, 32: 300.0}) == 32


def test_a_per_call_cost_makes_big_batches_pay_and_a_per_row_cost_does_not():
    clock = Clock()
    overhead_bound = CostedSession(clock, per_call_s=0.002, per_row_s=0.00001)
    rates = measure(overhead_bound, candidate_sizes(32), clock=clock)
    assert sorted(rates) == [1, 2, 4, 8, 16, 32]
    assert choose(rates) == 32
    assert rates[32] == pytest.approx(32 / (0.002 + 32 * 0.00001))

    compute_bound = CostedSession(clock, per_call_s=0.000005, per_row_s=0.004)
    assert choose(measure(compute_bound, candidate_sizes(32), clock=clock)) == 1


def test_a_slow_model_is_measured_within_the_budget_and_a_failing_size_ends_it():
    clock = Clock()
    slow = CostedSession(clock, per_call_s=0.0, per_row_s=1.0)  # a second a row
    rates = measure(slow, candidate_sizes(32), budget_s=3.0, clock=clock)
    assert list(rates) == [1]  # batch 2 would not fit in what is left
    assert clock.now <= 5.0

    clock = Clock()
    limited = CostedSession(clock, per_call_s=0.002, per_row_s=0.00001, fails_over=8)
    rates = measure(limited, candidate_sizes(32), clock=clock)
    assert list(rates) == [1, 2, 4, 8]
    assert max(limited.calls) == 8


def test_figures_are_cached_per_batch_limit_and_remeasured_when_unusable(tmp_path):
    path = tmp_path / "key.batch-1x1.json"
    clock = Clock()
    session = CostedSession(clock, per_call_s=0.002, per_row_s=0.00001)
    import appliance.scheduling.batch_tuning as bt

    real_measure = bt.measure
    bt.measure = lambda s, sizes: real_measure(s, sizes, clock=clock)
    try:
        assert preferred_batch_size(session, 32, path) == 32
        record = json.loads(path.read_text())
        assert record["preferred"] == 32 and set(record["rows_per_s"]) == {
            "1", "2", "4", "8", "16", "32"}

        session.calls.clear()
        assert preferred_batch_size(session, 32, path) == 32
        assert session.calls == []  # reused, nothing run

        assert preferred_batch_size(session, 8, path) == 8  # another limit: measured
        assert session.calls and max(session.calls) == 8

        path.write_text("{not json")
        session.calls.clear()
        assert preferred_batch_size(session, 8, path) == 8
        assert session.calls and json.loads(path.read_text())["preferred"] == 8

        dynamic = CostedSession(clock, 0.001, 0.001, shape=(3, -1))
        assert preferred_batch_size(dynamic, 8, tmp_path / "other.json") is None
        assert dynamic.calls == []  # no shape to measure with
    finally:
        bt.measure = real_measure


def test_config_refuses_both_ways_of_preferring_and_a_model_without_batch(short_tmp,
                                                                          demo_files):
    repo = Repository(short_tmp / "data")
    both = short_tmp / "both.toml"
    both.write_text("[dynamic_batching]\npreferred_batch_sizes = [4]\n"
                    "auto_preferred_batch = true\n")
    with pytest.raises(ConfigError, match="not both"):
        repo.add("cnn", demo_files["cnn"], config_path=both)
    unbatched = short_tmp / "unbatched.toml"
    unbatched.write_text("max_batch_size = 0\n[dynamic_batching]\nauto_preferred_batch = true\n")
    with pytest.raises(ConfigError, match="needs a batch dimension"):
        repo.add("mlp", demo_files["mlp"], config_path=unbatched)
    assert repo.models() == []  # nothing half-added
    repo.close()


def test_the_server_measures_at_load_and_reuses_the_figures_after_a_restart(short_tmp,
                                                                            demo_files):
    from appliance.demo.launcher import ServerProcess
    from tests.conftest import add_demo_models

    data = add_demo_models(short_tmp, {"mlp": demo_files["mlp"]}, configs={
        "mlp": "max_batch_size = 16\n[dynamic_batching]\nauto_preferred_batch = true\n"})
    for attempt in range(2):
        proc = ServerProcess(data).start()
        try:
            with Client(proc.socket_path) as c:
                row = c.stats("mlp")["models"][0]
                out = c.infer("mlp", {"features": np.ones((3, 32), np.float32)})
        finally:
            assert proc.stop() == 0, proc.log_tail()
        (figures,) = (data / "engines").glob("*.batch-*.json")
        record = json.loads(figures.read_text())
        assert row["preferred_batch_sizes"] == [record["preferred"]]
        assert 1 <= record["preferred"] <= 16
        assert set(record["rows_per_s"]) <= {"1", "2", "4", "8", "16"}
        assert out["probs"].shape[0] == 3
        if attempt == 0:
            first = figures.stat().st_mtime_ns
        else:
            assert figures.stat().st_mtime_ns == first  # reused, not measured again


def test_the_appliance_default_applies_where_a_model_config_is_silent(short_tmp, demo_files):
    from appliance.config.schema import BatchingConfig

    repo = Repository(short_tmp / "data")
    on = BatchingConfig(auto_preferred_batch=True)
    preferred = short_tmp / "preferred.toml"
    preferred.write_text("[dynamic_batching]\npreferred_batch_sizes = [4]\n")
    opt_out = short_tmp / "off.toml"
    opt_out.write_text("[dynamic_batching]\nauto_preferred_batch = false\n")
    unbatched = short_tmp / "unbatched.toml"
    unbatched.write_text("max_batch_size = 0\n")
    repo.add("silent", demo_files["mlp"], defaults=on)
    repo.add("preferred", demo_files["mlp"], config_path=preferred, defaults=on)
    repo.add("off", demo_files["mlp"], config_path=opt_out, defaults=on)
    repo.add("unbatched", demo_files["mlp"], config_path=unbatched, defaults=on)
    repo.add("default_off", demo_files["mlp"])

    def auto(name: str) -> bool:
        return repo.version(name, 1).config().dynamic_batching.auto_preferred_batch

    assert auto("silent") is True
    assert auto("preferred") is False  # its own sizes win, no error
    assert auto("off") is False
    assert auto("unbatched") is False  # nothing to measure, no error
    assert auto("default_off") is False
    repo.close()
