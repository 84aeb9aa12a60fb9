"""/metrics after a known workload: the counts, and the same figures through `stats`."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.client import Client
from appliance.demo.models import sample_inputs
from appliance.errors import InvalidArgument
from tests.support.http_server import served_http


@pytest.fixture
def served(demo_files):
    yield from served_http(demo_files)


def post(url, path: str, doc: dict | None = None) -> int:
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    c.request("POST", path, body=json.dumps(doc or {}).encode())
    status = c.getresponse().status
    c.close()
    return status


def scrape(url) -> dict[tuple[str, tuple], float]:
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    c.request("GET", "/metrics")
    resp = c.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/plain")
    text = resp.read().decode()
    c.close()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def labels(model: str, **extra) -> tuple:
    return tuple(sorted({"model": model, "version": "1", **extra}.items()))


def test_metrics_count_a_known_workload(served):
    proc, url = served
    x = sample_inputs("identity", batch=1)["x"]
    body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}
    for _ in range(5):  # one at a time: each is its own batch of one
        assert post(url, "/v2/models/identity/infer", body) == 200
    wrong = {"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32",
                         "data": [0.0] * 15}]}
    for _ in range(2):
        assert post(url, "/v2/models/identity/infer", wrong) == 400
    with Client(proc.socket_path) as c:
        c.infer("identity", {"x": sample_inputs("identity", batch=4)["x"]})  # 4 rows, 1 run
        with pytest.raises(InvalidArgument):
            c.infer("identity", {"x": np.zeros((1, 15), np.float32)})
        stats = {(r["model"], r["version"]): r for r in c.stats()["models"]}

    m = scrape(url)
    ident = labels("identity")
    assert m[("outpost_request_success_total", ident)] == 6
    assert m[("outpost_request_failure_total", labels("identity", code="INVALID_ARGUMENT"))] == 3
    assert m[("outpost_inference_count_total", ident)] == 9
    assert m[("outpost_execution_count_total", ident)] == 6
    assert m[("outpost_request_duration_seconds_count", ident)] == 6
    assert m[("outpost_request_duration_seconds_bucket", labels("identity", le="+Inf"))] == 6
    assert m[("outpost_queue_duration_seconds_count", ident)] == 6
    assert m[("outpost_compute_duration_seconds_count", ident)] == 6
    assert 0 < m[("outpost_request_duration_seconds_sum", ident)] < 6
    assert m[("outpost_request_success_total", labels("mlp"))] == 0
    assert m[("outpost_queue_depth", ident)] == 0
    assert m[("outpost_model_ready", ident)] == 1
    assert m[("outpost_models_loaded", ())] == 3
    assert m[("process_cpu_seconds_total", ())] > 0
    assert m[("process_resident_memory_bytes", ())] > 0

    # The socket's stats op reports the same figures.
    st = stats[("identity", 1)]
    assert st["request_success"] == 6 and st["request_failure"] == 3
    assert st["failures_by_code"] == {"INVALID_ARGUMENT": 3}
    assert st["inference_count"] == 9 and st["execution_count"] == 6
    hist = st["histograms"]
    cumulative = np.cumsum(hist["request"]).tolist()
    for bound, count in zip([*map(str, hist["bounds_s"]), "+Inf"], cumulative, strict=True):
        assert m[("outpost_request_duration_seconds_bucket",
                  labels("identity", le=bound))] == count
    assert m[("outpost_request_duration_seconds_sum", ident)] == pytest.approx(
        hist["request_sum_s"])


def test_models_loaded_follows_model_control(served):
    _, url = served
    assert post(url, "/v2/repository/models/cnn/unload") == 200  # loopback, no token set
    m = scrape(url)
    assert m[("outpost_models_loaded", ())] == 2
    assert ("outpost_model_ready", labels("cnn")) not in m
    assert post(url, "/v2/repository/models/cnn/load") == 200
    m = scrape(url)
    assert m[("outpost_models_loaded", ())] == 3
    assert m[("outpost_request_success_total", labels("cnn"))] == 0
