"""The gRPC endpoint's config and life: addresses refused when the config is read, model
control closed on a public address without a token, a port in use, a stop that ends the
streams once they have answered."""

from __future__ import annotations

import asyncio
import queue
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import tritonclient.grpc as gc
from tritonclient.utils import InferenceServerException

from appliance.config.load import load_config
from appliance.errors import ConfigError
from appliance.transport.grpc.server import GrpcServer
from tests.transport.grpc.conftest import start_grpc_server


@pytest.mark.parametrize(("overrides", "words"), [
    ({"grpc.address": "0.0.0.0:8001"}, ("grpc.address", "not a loopback address",
                                        "grpc.public", "grpc.admin_token")),
    ({"grpc.address": "localhost"}, ("grpc.address", "HOST:PORT")),
    ({"grpc.admin_token": "a", "grpc.admin_token_file": "/x"},
     ("grpc.admin_token", "not both")),
    ({"grpc.max_message_bytes": 1 << 31}, ("grpc.max_message_bytes", "2147483647")),
    ({"grpc.max_inflight": 0}, ("grpc.max_inflight",)),
])
def test_bad_settings_are_refused_when_the_config_is_read(overrides, words):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=overrides)
    message = str(caught.value)
    for word in words:
        assert word.split(".")[-1] in message, (word, message)
    assert "grpc." in message


def test_a_public_address_is_allowed_when_asked_for():
    config = load_config(overrides={"grpc.address": "0.0.0.0:8001", "grpc.public": True})
    assert config.grpc.public and config.grpc.token() == ""


def test_a_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(overrides={"grpc.address": f"127.0.0.1:{port}"})
        service = SimpleNamespace(shared_memory=None, protocol_counts=None)
        with pytest.raises(ConfigError, match=rf"grpc.address 127.0.0.1:{port}: can't listen"):
            asyncio.run(GrpcServer(service, config).start())


@pytest.fixture
def public(demo_files, short_tmp):
    """A server on a public footing (loopback here, as every test) with no admin token."""
    proc, target = start_grpc_server(short_tmp / "data", {"mlp": demo_files["mlp"]},
                                     {"public": True, "max_inflight": 1})
    yield proc, target
    proc.kill()


def test_public_without_token_closes_model_control_and_serves_on(public):
    """And grpc.max_inflight = 1: a stream open, a call more is refused."""
    proc, target = public
    client = gc.InferenceServerClient(target)
    for call in (client.get_model_repository_index, lambda: client.unload_model("mlp"),
                 lambda: client.register_system_shared_memory("r", "/k", 8)):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "grpc.admin_token" in caught.value.message()

    # The stop: a stream open (and idle) ends once it has answered; the process exits 0
    # well before the drain timeout (5 s).
    answers: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    x = gc.InferInput("features", [1, 32], "FP32")
    x.set_data_from_numpy(np.zeros((1, 32), np.float32))
    client.async_stream_infer("mlp", [x], request_id="before")
    result, error = answers.get(timeout=10)
    assert error is None and result.get_response().id == "before"
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mlp", [x])  # the stream is the one call in flight allowed
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "grpc.max_inflight = 1" in caught.value.message()
    assert client.is_server_live()  # probes don't count
    t0 = time.monotonic()
    code = proc.stop()
    assert code == 0, proc.log_tail()
    assert time.monotonic() - t0 < 3.0
    client.stop_stream()
    client.close()
    log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "drain timed out" not in log


def test_config_show_keeps_the_admin_token_secret(short_tmp):
    config = short_tmp / "outpost.toml"
    config.write_text('[grpc]\naddress = "127.0.0.1:8001"\nadmin_token = "sekrit"\n')
    shown = subprocess.run([sys.executable, "-m", "appliance", "config", "show", "--config",
                            str(config)], capture_output=True, text=True, check=True).stdout
    assert 'address = "127.0.0.1:8001"' in shown
    assert "sekrit" not in shown and 'admin_token = "<set, not shown>"' in shown
