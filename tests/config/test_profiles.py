"""Firmware profiles: the shipped files, validation errors, detection, the CLI, and how a
profile feeds the config defaults, the build fields and the engine choice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import profiles
from appliance.config.load import load_config
from appliance.errors import ConfigError
from appliance.models.loaded import build_options
from appliance.models.model_config import ModelConfig

SHIPPED = {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
           "jetson-xavier-nx-8gb", "x86-gpu-workstation", "x86-cpu"}


def outpost(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})},
                          check=False)


def test_shipped_profiles_load_with_their_figures():
    loaded = {p.name: p for p in profiles.all_profiles()}
    assert set(loaded) == SHIPPED
    nano, nx, agx, xavier = (loaded[n] for n in ("jetson-orin-nano-8gb", "jetson-orin-nx-16gb",
                                                 "jetson-agx-orin-64gb", "jetson-xavier-nx-8gb"))
    assert (nano.device.memory_mb, nano.device.dla_cores) == (8192, 0)
    assert (nx.device.memory_mb, nx.device.dla_cores) == (16384, 2)
    assert (agx.device.memory_mb, agx.device.dla_cores) == (65536, 2)
    assert (xavier.device.compute_capability, xavier.device.dla_cores) == ("7.2", 2)
    assert loaded["x86-cpu"].engine.kind == "onnxruntime"
    for p in loaded.values():
        assert Path(p.path).read_text().startswith("#"), f"{p.name} has no comment header"
        if p.engine.kind == "tensorrt":
            assert p.memory.budget_percent > 0 and p.engine.precision == "fp16"


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    """A profiles folder searched before the shipped ones."""
    monkeypatch.setenv("OUTPOST_PROFILES_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("body, words", [
    ("[engine]\nprecision = \"fp8\"\n", ["bad.toml", "precision 'fp8'", "fp32, fp16, bf16"]),
    ("[engine]\nworkspace = 512\n", ["bad.toml", "unknown key 'engine.workspace'",
                                      "workspace_mb"]),
    ("[engine]\nworkspace_mb = \"1G\"\n", ["bad.toml", "'engine.workspace_mb'",
                                            "must be an integer"]),
    ("[engine]\nkind = \"tensorrt\"\nprecision = \"fp16\"\ndla_core = 1\n"
     "[device]\ndla_cores = 1\n", ["bad.toml", "engine.dla_core = 1", "0..0"]),
    ("[engine]\nkind = \"tensorrt\"\nprecision = \"fp16\"\ndla_core = 0\n",
     ["bad.toml", "has no DLA", "use -1"]),
    ("[engine]\nkind = \"tvm\"\n", ["bad.toml", "kind 'tvm'", "tensorrt, onnxruntime"]),
    ("[batching]\ninstances = 0\n", ["bad.toml", "batching.", "instances must be >= 1"]),
    ("[server]\nbusy_poll_us = -1\n", ["bad.toml", "server.", "busy_poll_us must lie in"]),
    ("[server]\nsocket_path = \"/x\"\n", ["bad.toml", "unknown key 'server.socket_path'",
                                             "busy_poll_us"]),
    ("name = \"other\"\n", ["bad.toml", "'name' is 'other'", "rename"]),
    ("[engine\n", ["bad.toml", "not valid TOML"]),
])
def test_invalid_profile_names_file_key_and_what_is_allowed(profile_dir, body, words):
    (profile_dir / "bad.toml").write_text(body)
    with pytest.raises(ConfigError) as info:
        profiles.load_profile("bad")
    for w in words:
        assert w in str(info.value)


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown firmware profile 'jetson-nano'.*x86-cpu"):
        profiles.load_profile("jetson-nano")


# -- detection -----------------------------------------------------------------------------


def board(tmp_path, model: str) -> Path:
    path = tmp_path / "model"
    path.write_bytes(model.encode() + b"\0")  # the device tree's string is NUL-terminated
    return path


@pytest.mark.parametrize("model, memory_mb, expect", [
    ("NVIDIA Jetson Orin Nano Developer Kit", 7620, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15660, "jetson-orin-nx-16gb"),
    ("Jetson AGX Orin", 62800, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson Xavier NX Developer Kit", 7760, "jetson-xavier-nx-8gb"),
])
def test_detect_from_device_tree(tmp_path, model, memory_mb, expect):
    d = profiles.detect(device_tree=board(tmp_path, model), memory_mb=memory_mb, gpu_name="")
    assert (d.profile.name, d.source) == (expect, "device-tree")
    assert model in d.reason


def test_a_smaller_variant_is_not_taken_for_the_big_one(tmp_path):
    d = profiles.detect(device_tree=board(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit"),
                        memory_mb=30_000, gpu_name="")
    assert d.profile.name == "x86-cpu" and d.source == "none"
    assert "jetson-agx-orin-64gb" in d.reason and "30000 MiB" in d.reason
    assert "write a profile" in d.reason


def test_detect_from_gpu_name_when_no_device_tree(tmp_path):
    d = profiles.detect(device_tree=tmp_path / "absent", memory_mb=65536,
                        gpu_name="NVIDIA GeForce RTX 4090")
    assert (d.profile.name, d.source) == ("x86-gpu-workstation", "gpu")
    d = profiles.detect(device_tree=tmp_path / "absent", memory_mb=65536, gpu_name="Weird GPU")
    assert d.profile.name == "x86-cpu" and "matches no profile" in d.reason


def test_detect_neither(tmp_path):
    d = profiles.detect(device_tree=tmp_path / "absent", memory_mb=4096, gpu_name="")
    assert (d.profile.name, d.source) == ("x86-cpu", "none")
    assert "no CUDA device" in d.reason


def test_detect_on_this_host_says_why():
    d = profiles.detect()
    assert d.profile.name in SHIPPED and d.reason


# -- what a profile feeds ------------------------------------------------------------------


def test_profile_defaults_feed_the_config_where_it_is_silent(tmp_path):
    path = tmp_path / "outpost.toml"
    path.write_text("profile = \"jetson-agx-orin-64gb\"\n[batching]\nmax_batch_size = 4\n")
    config = load_config(path)
    assert config.batching.max_batch_size == 4  # the file wins
    assert config.batching.instances == 2 and config.batching.max_queue_delay_us == 500
    assert config.threads.intra_op == "auto"  # the profile's: measured per model
    path.write_text("profile = \"jetson-agx-orin-64gb\"\n[threads]\nintra_op = 4\n")
    assert load_config(path).threads.intra_op == 4  # the file wins
    path.write_text("profile = \"jetson-agx-orin-64gb\"\n[batching]\nmax_batch_size = 4\n")
    cli = load_config(path, {"threads.intra_op": 3})
    assert cli.threads.intra_op == 3  # and a flag wins
    # the profile's share of this host's memory (on the board itself: its unified memory)
    from appliance.config.profiles import host_memory_mb

    assert config.residency.memory_budget_mb == 50 * host_memory_mb() // 100
    path.write_text("profile = \"jetson-agx-orin-64gb\"\n[residency]\nmemory_budget_mb = 100\n")
    assert load_config(path).residency.memory_budget_mb == 100


def test_busy_polling_is_on_for_mains_powered_x86_and_off_on_jetson(tmp_path):
    """The profile sets server.busy_poll_us where the config is silent; the config wins."""
    loaded = {p.name: p for p in profiles.all_profiles()}
    assert {n for n, p in loaded.items() if p.server.busy_poll_us} == {
        "x86-cpu", "x86-gpu-workstation"}
    path = tmp_path / "outpost.toml"
    path.write_text("profile = \"x86-cpu\"\n")
    assert load_config(path).server.busy_poll_us == loaded["x86-cpu"].server.busy_poll_us
    path.write_text("profile = \"jetson-orin-nano-8gb\"\n")
    assert load_config(path).server.busy_poll_us == 0
    path.write_text("profile = \"x86-cpu\"\n[server]\nbusy_poll_us = 0\n")
    assert load_config(path).server.busy_poll_us == 0
    assert load_config(path, {"server.busy_poll_us": 200}).server.busy_poll_us == 200
    path.write_text("[server]\nbusy_poll_us = 20000\n")
    with pytest.raises(ConfigError, match=r"outpost.toml: server.busy_poll_us must lie in "
                                          r"0..10000"):
        load_config(path)


def test_unknown_profile_in_config_names_the_file(tmp_path):
    path = tmp_path / "outpost.toml"
    path.write_text("profile = \"orin\"\n")
    with pytest.raises(ConfigError, match=r"outpost.toml: profile: unknown firmware profile"):
        load_config(path)


def test_build_options_take_the_profile_build_fields():
    nx = profiles.load_profile("jetson-orin-nx-16gb")
    opts = build_options(ModelConfig(max_batch_size=16), nx)
    assert (opts.precision, opts.workspace_bytes, opts.optimization_level, opts.dla_core) == \
        ("fp16", 1024 << 20, 3, -1)
    assert (opts.max_batch_size, opts.opt_batch_size) == (16, 8)
    assert build_options(ModelConfig(max_batch_size=16)).precision == "fp32"


def test_auto_engine_falls_back_to_onnxruntime_with_its_reason():
    from engines import select_engine
    from engines.tensorrt import probe

    ok, why = probe()
    if ok:
        pytest.skip("TensorRT and a GPU are usable here: no fallback to see")
    engine, reason = select_engine("auto")
    assert engine.kind == "onnxruntime" and why in reason and reason.startswith("onnxruntime")
    gpu = profiles.Detection(profiles.load_profile("x86-gpu-workstation"), "gpu", "test")
    engine, reason = profiles.choose_engine("auto", gpu)
    assert engine.kind == "onnxruntime" and why in reason
    named = profiles.Detection(profiles.load_profile("x86-cpu"), "config", "named")
    assert "configured profile x86-cpu" in profiles.choose_engine("auto", named)[1]
    from engines.errors import EngineUnavailable

    with pytest.raises(EngineUnavailable, match="'tensorrt' was asked for but"):
        select_engine("tensorrt")


# -- the CLI, as a real process ------------------------------------------------------------


def test_cli_profiles_list_show_detect(tmp_path):
    out = outpost("profiles", "list")
    assert out.returncode == 0 and all(n in out.stdout for n in SHIPPED)
    show = outpost("profiles", "show", "jetson-orin-nano-8gb")
    assert show.returncode == 0 and "1024-core NVIDIA Ampere" in show.stdout
    det = outpost("profiles", "detect", "--json", "--device-tree",
                  str(board(tmp_path, "NVIDIA Jetson Xavier NX Developer Kit")))
    assert det.returncode == 0, det.stderr
    got = json.loads(det.stdout)
    # this host's memory decides whether an 8 GB board's profile fits
    assert got["source"] in ("device-tree", "none") and "Xavier NX" in got["reason"]
    bad = outpost("profiles", "show", "nope")
    assert bad.returncode == 2 and "unknown firmware profile 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_info_says_profile_and_engine_and_why(tmp_path):
    out = outpost("info", "--json", "--data-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["profile"] in SHIPPED and info["profile_reason"]
    assert info["engine"] in ("onnxruntime", "tensorrt") and info["engine_reason"]
    text = outpost("info", "--data-dir", str(tmp_path), "--profile", "x86-cpu")
    assert "engine:   onnxruntime" in text.stdout and "x86-cpu" in text.stdout


def test_server_logs_profile_and_engine_choice(server):
    server.stop()
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines()
             if line.startswith("{")]
    chosen = next(rec for rec in lines if rec["msg"] == "engine selected")
    profile = next(rec for rec in lines if rec["msg"] == "profile")
    assert chosen["engine"] in ("onnxruntime", "tensorrt") and chosen["reason"]
    assert profile["profile"] in SHIPPED and profile["reason"]
