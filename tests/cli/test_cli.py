"""The `outpost` command line, run as a real process: config, models, infer, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from appliance.config.load import load_config
from appliance.errors import ConfigError


def outpost(*args, env=None, check=True) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run([sys.executable, "-m", "appliance", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_config_defaults_file_and_flags(short_tmp):
    cfg = short_tmp / "outpost.toml"
    cfg.write_text('data_dir = "/var/lib/x"\n[server]\nmax_frame_bytes = 2048\n'
                   '[batching]\nmax_batch_size = 4\n')
    c = load_config(cfg, {"server.max_frame_bytes": 4096})
    assert c.data_dir == "/var/lib/x" and c.server.max_frame_bytes == 4096
    assert c.batching.max_batch_size == 4 and c.server.socket_path == "/var/lib/x/outpost.sock"
    out = outpost("config", "show", "--config", cfg, "--data-dir", short_tmp,
                  env={"XDG_RUNTIME_DIR": ""}).stdout
    assert f'data_dir = "{short_tmp}"' in out
    assert "max_frame_bytes = 2048" in out and "max_batch_size = 4" in out


@pytest.mark.parametrize("text,words", [
    ("[server]\nsokcet_path = 'x'\n", ("unknown key 'server.sokcet_path'", "socket_path")),
    ("[server]\nsocket_mode = '999'\n", ("socket_mode",)),
    ("[server]\ntcp = 'localhost'\n", ("HOST:PORT",)),
    ("engine = 'cuda'\n", ("engine", "onnxruntime")),
    ("[logging]\nlevel = 'loud'\n", ("level", "debug")),
    ("[batching]\ninstances = 0\n", ("instances",)),
    ("[threads]\nintra_op = 'two'\n", ("threads.intra_op", "whole number", "auto")),
    ("[threads]\nintra_op = 0\n", ("threads.intra_op", ">= 1")),
    ("[threads]\nspinning = 'sometimes'\n", ("threads.spinning", "true, false")),
    ("[batching]\ninstances = 'many'\n", ("instances", "auto")),
    ("data_dir = 5\n", ("data_dir", "string")),
    ("not toml at all [", ("not valid TOML",)),
])
def test_bad_config_is_one_clear_error(short_tmp, text, words):
    cfg = short_tmp / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    for w in words:
        assert w in str(e.value)
    proc = outpost("config", "show", "--config", cfg, check=False)
    assert proc.returncode == 2
    assert str(cfg) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_models_add_list_remove_and_infer(short_tmp, demo_files):
    d = short_tmp
    out = outpost("models", "add", "mlp", demo_files["mlp"], "--data-dir", d).stdout
    assert "added mlp version 1" in out and "features:float32[-1, 32]" in out
    cfg = d / "m.toml"
    cfg.write_text("max_batch_size = 4\n")
    outpost("models", "add", "mlp", demo_files["mlp"], "--data-dir", d, "--config", cfg,
            "--stage")
    listing = json.loads(outpost("models", "list", "--json", "--data-dir", d).stdout)
    assert listing[0]["name"] == "mlp" and listing[0]["active_version"] == 1
    assert [v["version"] for v in listing[0]["versions"]] == [1, 2]
    assert "1*, 2" in outpost("models", "list", "--data-dir", d).stdout
    bad = outpost("models", "add", "x", d / "missing.onnx", "--data-dir", d, check=False)
    assert bad.returncode == 1 and "no such model file" in bad.stderr
    assert "Traceback" not in bad.stderr

    from appliance.demo.launcher import ServerProcess

    with ServerProcess(d) as server:
        x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
        np.save(d / "x.npy", x)
        r = outpost("infer", "mlp", "--input", f"features={d / 'x.npy'}", "--socket",
                    server.socket_path, "--json")
        got = json.loads(r.stdout)
        assert got["model"] == "mlp" and got["version"] == 1
        assert np.allclose(np.array(got["outputs"]["probs"]).sum(axis=1), 1, atol=1e-5)
        outpost("infer", "mlp", "--input", f"features={d / 'x.npy'}", "--socket",
                server.socket_path, "--save", d / "out")
        saved = np.load(d / "out" / "probs.npy")
        np.testing.assert_allclose(saved, np.array(got["outputs"]["probs"]), rtol=1e-6)
        r = outpost("infer", "mlp", "--input", f"features={d / 'x.npy'}", "--socket",
                    server.socket_path, "--version", "2", check=False)
        assert r.returncode == 1 and "NOT_FOUND" in r.stderr  # staged, not loaded


def test_infer_errors_are_one_line(short_tmp, repo_with_demo):
    from appliance.demo.launcher import ServerProcess

    with ServerProcess(repo_with_demo) as server:
        np.save(short_tmp / "x64.npy", np.zeros((1, 16), np.float64))
        r = outpost("infer", "identity", "--input", f"x={short_tmp / 'x64.npy'}", "--socket",
                    server.socket_path, check=False)
        assert r.returncode == 1
        assert r.stderr.startswith("outpost: INVALID_ARGUMENT:") and "float64" in r.stderr
        r = outpost("infer", "nope", "--input", f"x={short_tmp / 'x64.npy'}", "--socket",
                    server.socket_path, check=False)
        assert "NOT_FOUND" in r.stderr
        r = outpost("infer", "identity", "--input", "x=/no/such.npy", "--socket",
                    server.socket_path, check=False)
        assert r.returncode == 1 and "can't read" in r.stderr
    r = outpost("infer", "identity", "--input", f"x={short_tmp / 'x64.npy'}", "--socket",
                short_tmp / "gone.sock", check=False)
    assert "UNAVAILABLE" in r.stderr and "is 'outpost serve' running" in r.stderr
    assert "Traceback" not in r.stderr
