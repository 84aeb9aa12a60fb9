"""The HTTP listener's lifecycle: off by default, --http, bad addresses, drain on SIGTERM."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from tests.support.http_server import http_url


def test_http_is_off_by_default(server):
    http_url_of = None
    for line in server.log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("msg") == "ready":
            http_url_of = record["http"]
    assert http_url_of is None


def _serve(args: list[str], data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", "serve", "--data-dir",
                           str(data_dir), "--socket", str(data_dir / "s.sock"), *args],
                          check=False, capture_output=True, text=True, timeout=60)


def test_non_loopback_address_needs_public(short_tmp):
    done = _serve(["--http", "0.0.0.0:8000"], short_tmp)
    assert done.returncode == 2
    assert "not a loopback address" in done.stderr and "http.public" in done.stderr
    assert "Traceback" not in done.stderr


def test_address_in_use_is_one_clear_line(short_tmp):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve(["--http", f"127.0.0.1:{port}"], short_tmp)
    assert done.returncode == 2
    assert f"http.address 127.0.0.1:{port}: can't listen there" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_drains_http_requests(repo_with_demo):
    proc = ServerProcess(repo_with_demo, extra_args=["--http", "127.0.0.1:0"]).start()
    url = urlsplit(http_url(proc))
    image = np.random.default_rng(1).random((32, 3, 224, 224), dtype=np.float32)
    head = json.dumps({"inputs": [{"name": "image", "shape": list(image.shape),
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": image.nbytes}}]}).encode()
    statuses: list[int] = []

    def one() -> None:
        c = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        c.request("POST", "/v2/models/cnn/infer", body=head + image.tobytes(),
                  headers={"Inference-Header-Content-Length": str(len(head))})
        resp = c.getresponse()
        resp.read()
        statuses.append(resp.status)
        c.close()

    thread = threading.Thread(target=one)
    thread.start()
    with Client(proc.socket_path) as c:  # wait until it is queued or running
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not statuses:
            rows = [r for r in c.stats()["models"] if r["model"] == "cnn"]
            if rows and rows[0]["inflight"] == 1:
                break
            time.sleep(0.001)
    assert not statuses, "the request finished before the test could signal"
    proc.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert proc.stop() == 0, proc.log_tail()
    assert statuses == [200]
    refused = socket.socket()
    try:
        assert refused.connect_ex((url.hostname, url.port)) != 0  # no longer listening
    finally:
        refused.close()
