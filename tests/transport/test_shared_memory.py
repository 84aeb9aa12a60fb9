"""System shared memory against the real server process: over the socket with outpost's
clients, over HTTP with tritonclient.http and tritonclient.utils.shared_memory, unchanged.
Inputs are read in place and outputs written into the region; every bad region (unknown,
too small, shrunk, unlinked, outside /dev/shm, a name twice) is one clear error and the
server keeps serving; nothing stays mapped that was released."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import urllib.request
from multiprocessing import shared_memory as mpshm
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from appliance.client import AsyncClient, Client
from appliance.demo.models import sample_inputs
from appliance.errors import InvalidArgument, NotFound
from tests.support.http_server import start_http_server


@pytest.fixture(scope="module")
def served(demo_files):
    data_dir = Path(tempfile.mkdtemp(prefix="op-"))
    proc, url = start_http_server(data_dir, demo_files)
    yield proc, url.removeprefix("http://")
    code = proc.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


def mapped(pid: int, key: str) -> bool:
    """Whether the server process maps the shared memory object ``key``."""
    name = "/dev/shm/" + key.lstrip("/")
    with open(f"/proc/{pid}/maps") as f:
        return any(line.rstrip().endswith(name) or f"{name} (deleted)" in line for line in f)


@pytest.fixture
def http(served):
    c = httpclient.InferenceServerClient(url=served[1])
    yield c
    c.unregister_system_shared_memory()
    c.close()


# -- the socket ----------------------------------------------------------------------------

def test_socket_inputs_and_outputs_through_a_region(served):
    proc, _ = served
    image = sample_inputs("cnn")["image"]
    with Client(proc.socket_path) as c:
        expected = c.infer("cnn", {"image": image})
        with c.shared_memory(image.nbytes + 4096) as region:
            x = region.tensor(image.shape, image.dtype)
            x.array[...] = image
            out = {name: region.tensor(a.shape, a.dtype, offset=image.nbytes + 2048 * i)
                   for i, (name, a) in enumerate(expected.outputs.items())}
            got = c.infer("cnn", {"image": x}, output_regions=out)
            for name, a in expected.outputs.items():
                np.testing.assert_allclose(got[name], a, rtol=1e-6)
                np.testing.assert_array_equal(out[name].array, got[name])  # in the region
            assert [r["name"] for r in c.regions()] == [region.name]
            assert mapped(proc.pid, region.key)
            key = region.key
        assert c.regions() == []
        assert not mapped(proc.pid, key)  # unregistered: unmapped


def test_async_client_region_and_a_mix_of_inline_and_region_outputs(served):
    proc, _ = served
    x = sample_inputs("mlp")["features"]

    async def go():
        async with await AsyncClient.connect(proc.socket_path) as c:
            plain = await c.infer("mlp", {"features": x})
            async with c.shared_memory(4096) as region:
                t = region.tensor(x.shape, x.dtype)
                t.array[...] = x
                probs = region.tensor(plain["probs"].shape, np.float32, offset=1024)
                got = await c.infer("mlp", {"features": t}, output_regions={"probs": probs})
                return plain["probs"].copy(), got["probs"].copy()

    plain, got = asyncio.run(go())
    np.testing.assert_allclose(got, plain, rtol=1e-6)


def test_a_connections_regions_go_when_it_closes(served):
    proc, _ = served
    c = Client(proc.socket_path)
    region = None
    try:
        from appliance.client import SharedRegion

        region = SharedRegion(4096)
        c.register_region(region)
        assert mapped(proc.pid, region.key)
    finally:
        c.close()
    with Client(proc.socket_path) as other:
        for _ in range(100):  # the close is seen on the server's next loop turn
            if region.name not in [r["name"] for r in other.regions()]:
                break
        assert region.name not in [r["name"] for r in other.regions()]
    assert not mapped(proc.pid, region.key)
    region.close()


def test_socket_bad_regions_are_clear_errors(served):
    proc, _ = served
    x = sample_inputs("identity")["x"]
    with Client(proc.socket_path) as c, c.shared_memory(256) as region:
        def infer_with(**window):
            tensor = {"dtype": "float32", "shape": list(x.shape), "shm": window}
            return c.call("infer", model="identity", inputs={"x": tensor})

        with pytest.raises(InvalidArgument, match="inputs.x.shm: no shared memory region "
                                                  "named 'nope'"):
            infer_with(region="nope", nbytes=x.nbytes)
        with pytest.raises(InvalidArgument, match="past the end of region"):
            infer_with(region=region.name, offset=200, nbytes=x.nbytes)
        with pytest.raises(InvalidArgument, match="the window is 60 bytes, but shape"):
            infer_with(region=region.name, nbytes=60)
        with pytest.raises(InvalidArgument, match="inputs.x.shm must be a map"):
            infer_with(nbytes=64)
        out = region.tensor((1, 8), np.float32, offset=0)  # too small for y (1x16)
        with pytest.raises(InvalidArgument, match="output_shm.y: the output takes 64 bytes"):
            c.infer("identity", {"x": x}, output_regions={"y": out})
        with pytest.raises(InvalidArgument, match="already registered"):
            c.call("shm_register", name=region.name, key=region.key, byte_size=64)
        for key in ("../etc/passwd", "/a/b", "", 7):
            with pytest.raises(InvalidArgument, match="'key'"):
                c.call("shm_register", name="bad", key=key, byte_size=64)
        with pytest.raises(InvalidArgument, match="past the end of"):
            c.call("shm_register", name="huge", key=region.key, byte_size=4 << 30)
        with pytest.raises(InvalidArgument, match="no shared memory object"):
            c.call("shm_register", name="gone", key="/outpost-no-such-object", byte_size=8)
        with pytest.raises(NotFound):
            c.call("shm_status", name="nope")
        assert c.health()["ready"]  # and it serves on


def test_a_symlink_out_of_dev_shm_is_refused(served, tmp_path):
    proc, _ = served
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    link = f"outpost-test-link-{os.getpid()}"
    os.symlink(secret, f"/dev/shm/{link}")
    try:
        with Client(proc.socket_path) as c, pytest.raises(InvalidArgument, match="can't open"):
            c.call("shm_register", name="link", key="/" + link, byte_size=64)
    finally:
        os.unlink(f"/dev/shm/{link}")


def test_a_region_shrunk_after_registration_is_an_error_not_a_crash(served):
    """Reading past a truncated object's end would be SIGBUS, the end of the server."""
    proc, _ = served
    x = sample_inputs("identity")["x"]
    with Client(proc.socket_path) as c, c.shared_memory(8192) as region:
        t = region.tensor(x.shape, x.dtype, offset=4096)
        t.array[...] = x
        np.testing.assert_array_equal(c.infer("identity", {"x": t})["y"], x)
        os.truncate("/dev/shm/" + region.key.lstrip("/"), 100)
        with pytest.raises(InvalidArgument, match="shrank to 100 bytes"):
            c.infer("identity", {"x": t})
        assert c.health()["live"]


def test_a_region_unlinked_after_registration_stays_readable(served):
    proc, _ = served
    x = sample_inputs("identity")["x"]
    with Client(proc.socket_path) as c, c.shared_memory(4096) as region:
        t = region.tensor(x.shape, x.dtype)
        t.array[...] = x
        mpshm.SharedMemory(region.key).unlink()  # gone from /dev/shm, still mapped
        np.testing.assert_array_equal(c.infer("identity", {"x": t})["y"], x)
        key = region.key
    assert not mapped(proc.pid, key)


# -- HTTP, with Triton's own client --------------------------------------------------------

def test_tritonclient_http_shared_memory_in_and_out(served, http):
    proc, _ = served
    image = sample_inputs("cnn")["image"]
    plain_in = httpclient.InferInput("image", list(image.shape), "FP32")
    plain_in.set_data_from_numpy(image, binary_data=True)
    expected = http.infer("cnn", [plain_in]).as_numpy("probs")

    key_in, key_out = f"/op-in-{os.getpid()}", f"/op-out-{os.getpid()}"
    region_in = shm.create_shared_memory_region("input", key_in, image.nbytes)
    region_out = shm.create_shared_memory_region("output", key_out, expected.nbytes)
    try:
        shm.set_shared_memory_region(region_in, [image])
        http.register_system_shared_memory("input", key_in, image.nbytes)
        http.register_system_shared_memory("output", key_out, expected.nbytes)
        status = {r["name"]: r for r in http.get_system_shared_memory_status()}
        assert status["input"]["key"] == key_in
        assert status["output"]["byte_size"] == expected.nbytes

        inp = httpclient.InferInput("image", list(image.shape), "FP32")
        inp.set_shared_memory("input", image.nbytes)
        out = httpclient.InferRequestedOutput("probs", binary_data=True)
        out.set_shared_memory("output", expected.nbytes)
        result = http.infer("cnn", [inp], outputs=[out])
        meta = result.get_output("probs")
        assert "data" not in meta and "parameters" not in meta  # the bytes are in the region
        got = shm.get_contents_as_numpy(region_out, np.float32, meta["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert mapped(proc.pid, key_in)

        http.unregister_system_shared_memory("input")
        assert [r["name"] for r in http.get_system_shared_memory_status()] == ["output"]
        assert not mapped(proc.pid, key_in)
    finally:
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)


def test_tritonclient_http_bad_regions(served, http):
    key = f"/op-bad-{os.getpid()}"
    region = shm.create_shared_memory_region("bad", key, 64)
    try:
        http.register_system_shared_memory("bad", key, 64)
        with pytest.raises(InferenceServerException, match="already registered"):
            http.register_system_shared_memory("bad", key, 64)
        with pytest.raises(InferenceServerException, match="past the end of"):
            http.register_system_shared_memory("big", key, 4 << 30)
        with pytest.raises(InferenceServerException, match="not a shared memory object name"):
            http.register_system_shared_memory("esc", "/../../etc/passwd", 64)
        inp = httpclient.InferInput("x", [1, 16], "FP32")
        inp.set_shared_memory("bad", 64)  # the whole region: 64 bytes, as 1x16 fp32
        assert http.infer("identity", [inp]).as_numpy("y").shape == (1, 16)
        inp.set_shared_memory("bad", 64, offset=8)
        with pytest.raises(InferenceServerException, match="input 'x': offset 8 \\+ 64 bytes "
                                                           "is past the end of region 'bad'"):
            http.infer("identity", [inp])
        inp.set_shared_memory("missing", 64)
        with pytest.raises(InferenceServerException, match="no shared memory region named "
                                                           "'missing'"):
            http.infer("identity", [inp])
        assert http.get_cuda_shared_memory_status() == []  # none is ever registered
        http.unregister_cuda_shared_memory()  # nothing to do: perf_analyzer does it each run
        with pytest.raises(InferenceServerException, match="CUDA shared memory is not served"):
            http.register_cuda_shared_memory("gpu", b"\0" * 64, 0, 64)
        with pytest.raises(InferenceServerException, match="no shared memory region named "
                                                           "'nope'"):
            http.get_system_shared_memory_status("nope")
    finally:
        http.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(region)


def test_metrics_count_requests_per_protocol(served, http):
    proc, url = served
    x = sample_inputs("identity")["x"]
    with Client(proc.socket_path) as c:
        c.infer("identity", {"x": x})
    inp = httpclient.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    http.infer("identity", [inp])
    text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("outpost_protocol_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    assert counts['outpost_protocol_requests_total{code="OK",protocol="socket"}'] >= 1
    assert counts['outpost_protocol_requests_total{code="OK",protocol="http"}'] >= 1
    assert any('code="INVALID_ARGUMENT"' in k for k in counts)  # the bad ones above
