"""Hot swap, activation failures and the active pointer, against the real server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from appliance import errors
from appliance.client import AsyncClient, Client
from appliance.demo.launcher import ServerProcess
from appliance.models.repository import Repository
from tests.support import tiny_models as tm


@pytest.fixture
def two_versions(short_tmp):
    repo = Repository(short_tmp)
    repo.add("m", tm.add_const(short_tmp / "v1.onnx", 1.0))
    repo.add("m", tm.add_const(short_tmp / "v2.onnx", 2.0), activate=False)
    repo.close()
    return short_tmp


def test_swap_under_load_drops_nothing(two_versions):
    """64 connections in continuous load while the active version flips 50 times: no
    failure, and every answer names the version that produced it and matches it."""
    with ServerProcess(two_versions) as server:
        async def go():
            stop = asyncio.Event()
            seen = {1: 0, 2: 0}
            bad: list = []

            async def worker(i: int) -> None:
                async with await AsyncClient.connect(server.socket_path) as c:
                    x = np.full((1, 16), i, np.float32)
                    while not stop.is_set():
                        try:
                            r = await c.infer("m", {"x": x})
                        except errors.OutpostError as exc:
                            bad.append(repr(exc))
                            continue
                        if not np.array_equal(r["y"], x + r.version):
                            bad.append(f"version {r.version} answered {r['y'][0, 0]}")
                        seen[r.version] += 1

            workers = [asyncio.create_task(worker(i)) for i in range(64)]
            admin = await AsyncClient.connect(server.socket_path)
            await asyncio.sleep(0.2)
            for k in range(50):
                r = await admin.call("activate", model="m", version=2 if k % 2 == 0 else 1)
                assert r["version"] == (2 if k % 2 == 0 else 1)
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.gather(*workers)
            await admin.close()
            return seen, bad

        seen, bad = asyncio.run(go())
        assert bad == []
        assert seen[1] > 100 and seen[2] > 100, seen
        with Client(server.socket_path) as c:
            models = {m["name"]: m for m in c.models()}
            assert models["m"]["active_version"] == 1  # 50 flips end where they started
            st = c.stats("m")
            assert all(row["request_failure"] == 0 for row in st["models"])


def test_active_pointer_survives_restart(two_versions):
    with ServerProcess(two_versions) as server, Client(server.socket_path) as c:
        assert c.call("activate", model="m", version=2)["previous"] == 1
    with ServerProcess(two_versions) as server, Client(server.socket_path) as c:
        r = c.infer("m", {"x": np.zeros((1, 16), np.float32)})
        assert r.version == 2 and r["y"][0, 0] == 2.0
        assert [v["state"] for v in c.models()[0]["versions"]] == ["unloaded", "ready"]


def test_failed_activation_keeps_the_old_version(two_versions):
    repo = Repository(two_versions)
    repo.add("m", tm.failing_at_run(two_versions / "bad.onnx"), version=3, activate=False)
    repo.close()
    with ServerProcess(two_versions) as server, Client(server.socket_path) as c:
        with pytest.raises(errors.FailedPrecondition) as e:
            c.call("activate", model="m", version=3)
        assert "version 3" in str(e.value) and "failed to load" in str(e.value)
        r = c.infer("m", {"x": np.zeros((1, 16), np.float32)})
        assert r.version == 1 and r["y"][0, 0] == 1.0
        with pytest.raises(errors.NotFound):
            c.call("activate", model="m", version=9)
        with pytest.raises(errors.InvalidArgument):
            c.call("activate", model="m", version="two")
    assert Repository(two_versions).model("m").active_version == 1


def test_cli_activate_with_and_without_a_server(two_versions):
    from tests.cli.test_cli import outpost

    out = outpost("models", "activate", "m", "2", "--data-dir", two_versions,
                  "--socket", two_versions / "none.sock").stdout
    assert "next start" in out
    assert Repository(two_versions).model("m").active_version == 2
    with ServerProcess(two_versions) as server:
        out = outpost("models", "activate", "m", "1", "--data-dir", two_versions,
                      "--socket", server.socket_path).stdout
        assert "version 1 is active (was 2)" in out
        with Client(server.socket_path) as c:
            assert c.infer("m", {"x": np.zeros((1, 16), np.float32)}).version == 1


def test_version_policy_and_pinning(short_tmp):
    cfg = short_tmp / "c.toml"
    cfg.write_text("[version_policy]\nkind = 'latest'\nlatest = 2\n")
    repo = Repository(short_tmp)
    for v in (1, 2, 3):
        repo.add("m", tm.add_const(short_tmp / f"v{v}.onnx", float(v)), config_path=cfg,
                 activate=(v == 3))
    repo.close()
    with ServerProcess(short_tmp) as server, Client(server.socket_path) as c:
        x = np.zeros((1, 16), np.float32)
        assert c.infer("m", {"x": x}).version == 3
        assert c.infer("m", {"x": x}, version=2)["y"][0, 0] == 2.0
        with pytest.raises(errors.NotFound, match="not served"):
            c.infer("m", {"x": x}, version=1)
        states = {v["version"]: v["state"] for v in c.models()[0]["versions"]}
        assert states == {1: "unloaded", 2: "ready", 3: "ready"}
