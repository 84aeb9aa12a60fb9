"""A firmware profile's [updater] table: the download cap and windows of its device class,
under the appliance config's own [updater] values."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config.profiles import all_profiles, load_profile, profile_files
from appliance.errors import ConfigError
from appliance.models.repository import Repository
from engines.onnxruntime_engine import OnnxRuntimeEngine
from updater.wiring import make_agent

BASE = "x86-cpu"


@pytest.fixture
def profiles(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("OUTPOST_PROFILES_DIR", str(folder))
    return folder


def _profile(folder: Path, name: str, updater: str) -> None:
    text = profile_files()[BASE].read_text()
    (folder / f"{name}.toml").write_text(text + "\n[updater]\n" + updater)


def _agent(tmp_path: Path, profile, **table):
    root = tmp_path / "root.json"
    root.write_text("{}")
    table = {"fleet_url": "http://127.0.0.1:9", "trusted_root": str(root), **table}
    repo = Repository(tmp_path / "data")
    agent = make_agent(table, tmp_path / "data", repo, OnnxRuntimeEngine(), profile)
    agent.close()
    repo.close()
    return agent


def test_the_profile_caps_downloads_on_its_devices(tmp_path, profiles):
    _profile(profiles, "metered", 'max_download_bytes_per_s = 50000\n'
                                  'download_windows = "01:00-05:00"\n')
    agent = _agent(tmp_path, load_profile("metered"))
    assert agent.config.max_download_bytes_per_s == 50000
    assert agent.config.download_windows == "01:00-05:00"


def test_the_config_wins_over_the_profile(tmp_path, profiles):
    _profile(profiles, "metered", "max_download_bytes_per_s = 50000\n")
    agent = _agent(tmp_path, load_profile("metered"), max_download_bytes_per_s=0,
                   download_windows="22:00-23:00")
    assert agent.config.max_download_bytes_per_s == 0
    assert agent.config.download_windows == "22:00-23:00"


def test_a_profile_without_the_table_leaves_downloads_as_the_config_says(tmp_path):
    agent = _agent(tmp_path, load_profile(BASE))
    assert agent.config.max_download_bytes_per_s == 0 and agent.config.download_windows == ""


def test_a_bad_window_in_a_profile_names_the_profile(tmp_path, profiles):
    _profile(profiles, "badwin", 'download_windows = "25:00-26:00"\n')
    with pytest.raises(ConfigError) as info:
        _agent(tmp_path, load_profile("badwin"))
    assert "download_windows" in str(info.value) and "badwin" in str(info.value)


@pytest.mark.parametrize("line, words", [
    ("max_download_bytes_per_s = -1\n", "max_download_bytes_per_s must be >= 0"),
    ('max_download_bytes_per_s = "fast"\n', "max_download_bytes_per_s"),
    ("paced = true\n", "unknown key"),
])
def test_bad_updater_tables_in_a_profile_are_refused_at_load(profiles, line, words):
    _profile(profiles, "bad", line)
    with pytest.raises(ConfigError, match=words):
        load_profile("bad")


def test_the_shipped_profiles_load_with_their_updater_tables():
    for p in all_profiles():
        assert p.updater.max_download_bytes_per_s >= 0
