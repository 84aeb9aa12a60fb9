"""The [http] config section: loopback unless public, token sources, limits."""

from __future__ import annotations

import pytest

from appliance.cli.main import main
from appliance.config.load import load_config
from appliance.errors import ConfigError


def http(**values):
    return load_config(None, {f"http.{k}": v for k, v in values.items()}).http


def test_off_by_default():
    assert http().address == ""


@pytest.mark.parametrize("address", ["127.0.0.1:8000", "127.5.5.5:0", "[::1]:8000",
                                     "localhost:8000"])
def test_loopback_addresses_need_nothing_more(address):
    assert http(address=address).address == address


@pytest.mark.parametrize("address", ["0.0.0.0:8000", "192.168.1.5:8000", "[::]:8000",
                                     "example.com:80"])
def test_other_addresses_need_public(address):
    with pytest.raises(ConfigError, match="not a loopback address.*http.public = true"):
        http(address=address)
    assert http(address=address, public=True).public


@pytest.mark.parametrize("values, words", [
    ({"address": "8000"}, "HOST:PORT"),
    ({"admin_token": "a", "admin_token_file": "/x"}, "not both"),
    ({"max_body_bytes": 10}, "max_body_bytes"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"max_inflight": 0}, "max_inflight"),
])
def test_bad_values(values, words):
    with pytest.raises(ConfigError, match=words):
        http(**values)


def test_admin_token_file(tmp_path):
    f = tmp_path / "admin.token"
    f.write_text("tok-1\n")
    assert http(admin_token_file=str(f)).token() == "tok-1"
    with pytest.raises(ConfigError, match="can't read a token"):
        http(admin_token_file=str(tmp_path / "missing")).token()


def test_config_show_hides_the_admin_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUTPOST_CONFIG", raising=False)
    cfg = tmp_path / "outpost.toml"
    cfg.write_text('[http]\naddress = "127.0.0.1:8000"\nadmin_token = "hunter2"\n')
    assert main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and 'address = "127.0.0.1:8000"' in out
