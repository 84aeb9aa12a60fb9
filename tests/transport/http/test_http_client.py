"""The real tritonclient[http] client against the real `outpost serve --http` process."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from appliance.client import Client
from appliance.demo.models import DEMO_MODELS, sample_inputs
from tests.support.http_server import start_http_server

TOKEN = "s3cret-admin"


@pytest.fixture(scope="module")
def served(demo_files):
    data_dir = Path(tempfile.mkdtemp(prefix="op-"))
    token_file = data_dir.parent / f"{data_dir.name}.token"
    token_file.write_text(TOKEN + "\n")
    proc, url = start_http_server(data_dir, demo_files, {"admin_token_file": str(token_file)})
    yield proc, url
    code = proc.stop()
    token_file.unlink()
    shutil.rmtree(data_dir, ignore_errors=True)
    assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


@pytest.fixture
def client(served):
    _, url = served
    c = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
    yield c
    c.close()


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "outpost"
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_repository" in meta["extensions"]


def test_model_metadata_and_config(client):
    meta = client.get_model_metadata("cnn")
    assert meta["name"] == "cnn" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}]
    assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata("cnn", model_version="1") == meta
    assert client.is_model_ready("cnn") and client.is_model_ready("cnn", "1")
    config = client.get_model_config("mlp")
    assert config["max_batch_size"] == 32
    assert config["input"][0]["name"] == "features" and config["input"][0]["dims"] == [32]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["output"][0]["dims"] == [3]


def _socket_outputs(proc, model, inputs):
    with Client(proc.socket_path) as c:
        return c.infer(model, inputs).outputs


@pytest.mark.parametrize("model", DEMO_MODELS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_socket(served, client, model, binary):
    proc, _ = served
    inputs = sample_inputs(model, batch=2, seed=3)
    if model == "cnn" and not binary:
        inputs = sample_inputs(model, batch=1, seed=3)  # keep the JSON body a few MB
    http_inputs = []
    for name, array in inputs.items():
        t = httpclient.InferInput(name, list(array.shape), "FP32")
        t.set_data_from_numpy(array, binary_data=binary)
        http_inputs.append(t)
    want = _socket_outputs(proc, model, inputs)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in want]
    result = client.infer(model, http_inputs, outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response["model_name"] == model and response["model_version"] == "1"
    assert response["id"] == "r-1"
    for name, expected in want.items():
        entry = result.get_output(name)
        if binary:
            assert entry["parameters"] == {"binary_data_size": expected.nbytes}
            assert "data" not in entry
        else:
            assert "parameters" not in entry
        got = result.as_numpy(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if binary:
            np.testing.assert_array_equal(got, expected)
        else:  # JSON numbers round-trip float32 exactly through Python floats
            np.testing.assert_array_equal(got, expected)


def test_default_outputs_come_back_binary(client):
    """No outputs named: tritonclient asks for binary_data_output; all outputs come back."""
    x = sample_inputs("identity", batch=3)["x"]
    t = httpclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    result = client.infer("identity", [t])
    assert result.get_output("y")["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_array_equal(result.as_numpy("y"), x)


def test_errors_through_the_client(client):
    x = sample_inputs("identity")["x"]
    t = httpclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("nosuch", [t])
    assert exc.value.status() == "404" and "nosuch" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.infer("identity", [t], model_version="7")
    assert exc.value.status() == "404" and "no version 7" in exc.value.message()
    wide = np.zeros((1, 17), np.float32)
    t = httpclient.InferInput("x", [1, 17], "FP32")
    t.set_data_from_numpy(wide)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("identity", [t])
    assert exc.value.status() == "400" and "shape [1, 17]" in exc.value.message()
    t = httpclient.InferInput("x", [1, 16], "FP64")
    t.set_data_from_numpy(np.zeros((1, 16), np.float64))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("identity", [t])
    assert exc.value.status() == "400" and "FP64" in exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("nosuch")
    assert exc.value.status() == "404"
    assert not client.is_model_ready("nosuch")


def test_model_control_with_token(client):
    with pytest.raises(InferenceServerException) as exc:
        client.unload_model("mlp")
    assert exc.value.status() == "401"
    assert client.is_model_ready("mlp")  # refused: still served
    client.unload_model("mlp", headers=ADMIN)
    assert not client.is_model_ready("mlp")
    index = {e["name"]: e for e in client.get_model_repository_index(headers=ADMIN)}
    assert index["mlp"]["state"] == "UNAVAILABLE"
    assert index["cnn"]["state"] == "READY"
    x = sample_inputs("mlp")["features"]
    t = httpclient.InferInput("features", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("mlp", [t])
    assert exc.value.status() == "404"
    client.load_model("mlp", headers=ADMIN)
    assert client.is_model_ready("mlp")
    assert client.infer("mlp", [t]).as_numpy("probs").shape == (1, 3)
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("nosuch", headers=ADMIN)
    assert exc.value.status() == "404"
    with pytest.raises(InferenceServerException) as exc:
        client.load_model("mlp", headers=ADMIN, config='{"max_batch_size": 4}')
    assert exc.value.status() == "400" and "not supported" in exc.value.message()


def test_statistics_extension(client):
    x = sample_inputs("identity")["x"]
    t = httpclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    before = client.get_inference_statistics("identity")["model_stats"][0]
    for _ in range(3):
        client.infer("identity", [t])
    after = client.get_inference_statistics("identity")["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 3)
    assert after["execution_count"] == before["execution_count"] + 3
