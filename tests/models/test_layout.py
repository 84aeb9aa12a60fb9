"""A model's layout at the real server, on the shipped profiles (threads, instances and the
preferred batch "auto"): measured at the first load, cached, reused after a restart;
what a config or flag fixes wins; the commands and /metrics show it; SIGTERM while it is
measured leaves nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from tests.conftest import add_demo_models
from tests.support.http_server import http_url

SHIPPED = {"OUTPOST_PROFILES_DIR": ""}  # the shipped profiles: "auto" everywhere


def outpost(*args, data_dir, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args, "--data-dir",
                           str(data_dir)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **SHIPPED}, check=False)


def layouts_on_disk(data_dir) -> list:
    return sorted((data_dir / "engines").glob("*.layout-*.json"))


def test_measured_at_first_load_then_reused_after_a_restart(short_tmp, demo_files):
    data = add_demo_models(short_tmp, {"mlp": demo_files["mlp"],
                                       "identity": demo_files["identity"]})
    rows = []
    for _ in range(2):
        with ServerProcess(data, env=SHIPPED, extra_args=["--http", "127.0.0.1:0"]) as s:
            with Client(s.socket_path) as c:
                rows.append({r["model"]: r for r in c.stats()["models"]})
                out = c.infer("mlp", {"features": np.ones((3, 32), np.float32)})
                assert out["probs"].shape == (3, 3)
            with urllib.request.urlopen(http_url(s) + "/metrics", timeout=10) as r:
                metrics = r.read().decode()
        if len(rows) == 1:
            files = {p: p.stat().st_mtime_ns for p in layouts_on_disk(data)}
    first, second = rows
    for model in ("mlp", "identity"):
        layout = first[model]["layout"]
        assert layout["source"] == "measured", layout
        assert layout["threads"] * layout["instances"] <= os.cpu_count()
        assert second[model]["layout"]["source"] == "cached"
        assert {k: v for k, v in second[model]["layout"].items() if k != "source"} == {
            k: v for k, v in layout.items() if k != "source"}
        assert first[model]["instances"] == layout["instances"]
        preferred = layout["preferred_batch"]
        assert first[model]["preferred_batch_sizes"] == ([preferred] if preferred else [])
    assert len(files) == 2  # one per model: each measured once
    assert {p: p.stat().st_mtime_ns for p in layouts_on_disk(data)} == files  # not again
    record = json.loads(next(iter(files)).read_text())
    assert record["measured"] and record["rule"]["latency_bound"] > 0
    (line,) = [x for x in metrics.splitlines()
               if x.startswith("outpost_model_layout{") and 'model="mlp"' in x]
    assert 'source="cached"' in line and line.endswith(" 1.0")


def test_what_a_config_or_flag_fixes_is_taken(short_tmp, demo_files):
    data = add_demo_models(short_tmp, {"mlp": demo_files["mlp"],
                                       "identity": demo_files["identity"]}, configs={
        "mlp": "threads = 2\ninstances = 1\n[dynamic_batching]\npreferred_batch_sizes = [4]\n"})
    with ServerProcess(data, env=SHIPPED, extra_args=["--threads", "1"]) as s, \
            Client(s.socket_path) as c:
        rows = {r["model"]: r for r in c.stats()["models"]}
    mlp, identity = rows["mlp"]["layout"], rows["identity"]["layout"]
    # The model's config wins over --threads; only spinning (the appliance's, "auto") was
    # left, and the MLP runs quicker than a thread hand-off: not spinning, not measured
    assert (mlp["threads"], mlp["instances"], mlp["spinning"]) == (2, 1, False)
    assert rows["mlp"]["preferred_batch_sizes"] == [4]
    (mlp_file,) = (data / "engines").glob("*.layout-*c-b32-2-1-a-4.json")
    measured = json.loads(mlp_file.read_text())["measured"]
    assert [(r["threads"], r["instances"], r["spinning"]) for r in measured] == [
        (2, 1, False)]
    # --threads wins over the profile's "auto": instances and batch still measured
    assert identity["threads"] == 1 and identity["source"] == "measured"
    (identity_file,) = (data / "engines").glob("*.layout-*c-b32-1-a-a-a.json")
    assert {r["threads"] for r in json.loads(identity_file.read_text())["measured"]} == {1}


def test_models_add_measures_ahead_and_the_commands_show_the_layout(short_tmp, demo_files):
    r = outpost("models", "add", "mlp", str(demo_files["mlp"]), data_dir=short_tmp)
    assert r.returncode == 0, r.stderr
    assert "layout:" in r.stdout and "measured" in r.stdout
    assert "measuring how mlp runs best here" in r.stderr  # the progress, off a terminal
    assert len(layouts_on_disk(short_tmp)) == 1
    listed = outpost("models", "list", data_dir=short_tmp)
    assert "layout:" in listed.stdout and "thread" in listed.stdout, listed.stdout
    info = json.loads(outpost("info", "--json", data_dir=short_tmp).stdout)
    assert info["cpus"]["count"] >= 1 and info["layout_policy"]["threads"] == "auto"
    assert [row["model"] for row in info["layouts"]] == ["mlp"]
    # The server finds it cached: it measures nothing at its first load.
    with ServerProcess(short_tmp, env=SHIPPED) as s, Client(s.socket_path) as c:
        assert c.stats("mlp")["models"][0]["layout"]["source"] == "cached"


def test_sigterm_while_measuring_leaves_nothing_half_written(short_tmp, demo_files):
    data = add_demo_models(short_tmp, {"cnn": demo_files["cnn"]})
    log_path = data / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--data-dir", str(data), "--socket",
             str(data / "s.sock"), "--log-format", "json"], stdout=log,
            stderr=subprocess.STDOUT, env={**os.environ, **SHIPPED})
        try:
            deadline = time.monotonic() + 60
            while "measuring the layout" not in log_path.read_text(errors="replace"):
                assert time.monotonic() < deadline and proc.poll() is None, \
                    log_path.read_text()
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    engines = data / "engines"
    assert not [p for p in engines.iterdir() if p.name.endswith(".tmp")]
    for path in layouts_on_disk(data):  # whole, or not there at all
        assert json.loads(path.read_text())["layout"]["threads"] >= 1
