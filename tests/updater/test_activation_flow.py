"""Maintenance windows and the app's word with the real pieces: a real fleet server
process on 127.0.0.1, releases published with `outpost fleet publish --activate-window /
--activate on-request`, and a device (`outpost update check` passes, or `outpost serve`
with its agent) whose local clock the test sets through OUTPOST_UPDATER_CLOCK_FILE (no
waiting for a window). A release is downloaded, validated and made ready at once, then
activated only inside its window, or once the app allows it over the socket or HTTP; a
deferral past the release's maximum is activated anyway and reported."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import urllib.error
import urllib.request
from datetime import datetime

import pytest

from appliance.client import AsyncClient, Client
from appliance.demo.launcher import ServerProcess
from appliance.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from tests.support.http_server import http_url
from tests.support.updater_support import (
    Fleet,
    active_version,
    journal_rows,
    make_device,
    run_outpost,
    wait_done,
    wait_for,
)
from updater.activation import CLOCK_ENV

SOCKET_TOKEN = "app-token"
ADMIN_TOKEN = "admin-token"


class Clock:
    """The device's local time, in a file its processes read at each look."""

    def __init__(self, path):
        self.path = path

    def set(self, iso: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(datetime.fromisoformat(iso).isoformat())
        os.replace(tmp, self.path)  # a reader never sees half a time

    @property
    def env(self) -> dict:
        return {CLOCK_ENV: str(self.path)}


@pytest.fixture
def clock(short_tmp):
    c = Clock(short_tmp / "clock")
    c.set("2025-06-02T12:00")
    return c


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "fleet")
    yield f
    f.stop()


def publish(fleet: Fleet, version: int, model, *flags: str) -> str:
    """`outpost fleet publish` with activation flags, then a rollout to every device."""
    result = run_outpost("fleet", "publish", fleet.dir, model, "--name", "identity",
                         "--version", str(version), *flags)
    assert result.returncode == 0, result.stderr
    fleet.repo.set_rollout("identity", version, new=True, fraction=1.0)
    return result.stdout


def reports(fleet: Fleet, version: int) -> list[tuple[str, str]]:
    with sqlite3.connect(fleet.dir / "fleet.db") as db:
        return db.execute("select state, detail from reports where version = ? order by id",
                          [version]).fetchall()


def test_a_windowed_release_is_ready_at_once_and_activated_only_inside_its_window(
        fleet, clock, short_tmp, demo_files):
    out = publish(fleet, 2, demo_files["identity"], "--activate-window", "22:00-04:00",
                  "--max-deferral", "2h")
    assert "activation: activates in the window 22:00-04:00 (local time); the app may " \
           "defer it up to 2h after it is ready" in out
    fleet.start()
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"])

    def check() -> str:
        result = run_outpost("update", "check", "--config", config, env=clock.env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    waiting = ("identity 1 -> 2: waiting_window (until 2025-06-02 22:00, when the "
               "activation window 22:00-04:00 (local time) opens)")
    assert waiting in check()  # 12:00
    assert active_version(data) == 1
    assert journal_rows(data)[-1]["step"] == "ready"
    assert [s for s, _ in reports(fleet, 2)] == [
        "downloading", "downloaded", "staged", "validated", "waiting_window"]
    assert reports(fleet, 2)[-1][1].startswith("until 2025-06-02 22:00")
    # Another process, still outside the window: it keeps waiting (the journal says
    # so), and the fleet is not told again.
    clock.set("2025-06-02T21:59")
    assert waiting in check()
    assert active_version(data) == 1 and len(reports(fleet, 2)) == 5
    # Past midnight, inside the window that spans it: activated, watched, committed.
    clock.set("2025-06-03T00:30")
    assert "identity 1 -> 2: committed" in check()
    assert active_version(data) == 2
    assert [s for s, _ in reports(fleet, 2)][-2:] == ["activated", "committed"]


def test_the_app_allows_over_the_socket_and_http_and_a_deferral_past_the_maximum_ends(
        fleet, clock, short_tmp, demo_files):
    clock.set("2025-06-02T10:00")
    publish(fleet, 2, demo_files["identity"], "--activate", "on-request")
    fleet.start()
    data = short_tmp / "dev"
    config = make_device(data, fleet, demo_files["identity"])
    config.write_text(config.read_text() + f'[server]\ntoken = "{SOCKET_TOKEN}"\n'
                      f'[http]\naddress = "127.0.0.1:0"\nadmin_token = "{ADMIN_TOKEN}"\n')

    def ready(version: int) -> dict:
        return wait_for(lambda: next((r for r in journal_rows(data) if r["version"] ==
                                      version and r["step"] == "ready"), None), 60,
                        f"{version} ready to activate")

    with ServerProcess(data, extra_args=["--config", str(config)], env=clock.env) as device:
        url = http_url(device) + "/v2/update/activation"
        # Over the socket: a connection that has not said hello with the token is
        # refused; then the app reads the state, says something wrong, then allows.
        ready(2)
        assert active_version(data) == 1
        with Client(device.socket_path) as c, pytest.raises(Unauthenticated):
            c.update_activation()
        with Client(device.socket_path) as c:
            c.hello(SOCKET_TOKEN)
            [pending] = c.update_activation()["updates"]
            assert (pending["version"], pending["state"]) == (2, "waiting_app")
            assert pending["activate_by"] == "2025-06-03 10:00"  # the default 24h
            with pytest.raises(InvalidArgument, match="action 'now' must be"):
                c.update_activation("now")
            with pytest.raises(InvalidArgument, match="for_s belongs to action"):
                c.update_activation("allow", for_s=60)
            [read] = asyncio.run(read_async(device.socket_path))["updates"]
            assert read == pending  # the async client has the op too
            [pending] = c.update_activation("allow")["updates"]
            assert pending["state"] == "activating"
            assert wait_done(data, 2, 60)["outcome"] == "committed"
            assert ("waiting_app", "waiting for the app to allow it (update_activation); "
                    "held at most until 2025-06-03 10:00: the release lets the app hold it "
                    "at most 24h after it was ready (2025-06-02 10:00)") in reports(fleet, 2)
            with pytest.raises(FailedPrecondition, match="no update waits for activation"):
                c.update_activation("allow")
        assert active_version(data) == 2

        # Over HTTP, with the admin token.
        publish(fleet, 3, demo_files["identity"], "--activate", "on-request")
        ready(3)
        assert http(url)[0] == 401  # no token
        assert http(url, {"action": "allow"}, token="wrong")[0] == 401
        status, body = http(url, {"action": "later"}, token=ADMIN_TOKEN)
        assert status == 400 and "action 'later' must be" in body["error"]
        status, body = http(url, {}, token=ADMIN_TOKEN)
        assert status == 400 and 'send {"action": "allow"}' in body["error"]
        status, body = http(url, token=ADMIN_TOKEN)
        assert status == 200 and body["updates"][0]["state"] == "waiting_app"
        status, body = http(url, {"action": "allow"}, token=ADMIN_TOKEN)
        assert status == 200 and body["updates"][0]["state"] == "activating", body
        assert wait_done(data, 3, 60)["outcome"] == "committed"

        # A deferral past the release's maximum: held to the maximum, then activated
        # anyway and reported so.
        publish(fleet, 4, demo_files["identity"], "--activate", "on-request",
                "--max-deferral", "1h")
        ready(4)
        status, body = http(url, {"action": "defer", "for_s": 3 * 3600}, token=ADMIN_TOKEN)
        [pending] = body["updates"]
        assert (status, pending["state"], pending["until"]) == (
            200, "waiting_app", "2025-06-02 11:00"), body
        assert "deferred by the app until 2025-06-02 13:00; held at most until " \
               "2025-06-02 11:00" in pending["detail"]
        wait_for(lambda: any(s == "waiting_app" and "deferred by the app" in d
                             for s, d in reports(fleet, 4)), 30, "the deferral reported")
        clock.set("2025-06-02T11:00")
        assert wait_done(data, 4, 60)["outcome"] == "committed"
        states = reports(fleet, 4)
        [expired] = [d for s, d in states if s == "deferral_expired"]
        assert expired.startswith("activated past the app's deferral (deferred by the app "
                                  "until 2025-06-02 13:00): the release lets the app hold "
                                  "it at most 1h")
        assert [s for s, _ in states][-3:] == ["deferral_expired", "activated", "committed"]
    assert active_version(data) == 4


@pytest.mark.parametrize(("flags", "says"), [
    (("--activate-window", "25:00-26:00"), "--activate-window: '25:00-26:00' has no such "
                                           "time of day"),
    (("--activate-window", "2am-4am"), "'2am-4am' is not a window; write HH:MM-HH:MM"),
    (("--activate-window", "04:00-04:00"), "starts where it ends"),
    (("--activate", "later"), "--activate 'later': the one mode is on-request"),
    (("--max-deferral", "24h"), "--max-deferral belongs to an activation policy"),
    (("--activate", "on-request", "--max-deferral", "a while"), "is not a duration"),
])
def test_a_bad_policy_is_one_line_and_publishes_nothing(fleet, demo_files, flags, says):
    before = sorted(p.name for p in (fleet.dir / "metadata").iterdir())
    result = run_outpost("fleet", "publish", fleet.dir, demo_files["identity"], "--name",
                         "identity", "--version", "2", *flags)
    assert result.returncode == 1
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert fleet.repo.releases() == []
    assert sorted(p.name for p in (fleet.dir / "metadata").iterdir()) == before
    assert not any(p.is_file() for p in (fleet.dir / "targets").rglob("*"))


def test_without_an_update_agent_the_op_says_so(module_server):
    with Client(module_server.socket_path) as c, \
            pytest.raises(FailedPrecondition, match="no update agent runs in this server"):
        c.update_activation("allow")


async def read_async(socket_path) -> dict:
    async with await AsyncClient.connect(socket_path) as c:
        await c.hello(SOCKET_TOKEN)
        return await c.update_activation()


def http(url: str, body: dict | None = None, token: str | None = None
         ) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or a POST."""
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
