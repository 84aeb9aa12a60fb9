"""Static hosting: the signed repository published with `outpost fleet sync` and served
by a plain static web server (Debian's nginx, and Python's http.server), the devices'
reports going to the fleet server (`updater.report_url`).

Real parts throughout: `fleet sync` and `fleet serve` run as processes, nginx and
http.server as processes on 127.0.0.1, devices are real agents (`outpost update check`),
and the published folder is read by python-tuf's ngclient over HTTP, as a device does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.updater_support import (
    Fleet,
    free_port,
    make_device,
    run_outpost,
    wait_for,
)
from updater.cohort import cohort_point
from updater.fetcher import Fetcher
from updater.fleet_repo import FleetRepo
from updater.fleet_sync import FAULT_ENV, LOCK_NAME, TMP_SUFFIX, read_view

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


# -- static servers ------------------------------------------------------------------------

class StaticHost:
    """A static web server process serving ``root`` on 127.0.0.1, and its request log."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _nginx_conf(root: Path, port: int, work: Path) -> str:
    # As root, nginx's workers would run as 'nobody', who can't read pytest's 0700 folders.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = "".join(f"{kind}_temp_path {work / kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
            f"error_log {work / 'error.log'} warn;\n"
            f"events {{ worker_connections 64; }}\n"
            f"http {{\n{temps}access_log {work / 'access.log'};\n"
            f"types {{ application/json json; application/x-tar tar; }}\n"
            f"default_type application/octet-stream;\n"
            f"server {{\nlisten 127.0.0.1:{port};\nroot {root};\n"
            # the one file that changes in place must not be cached (docs/ota.md)
            f"location = /metadata/timestamp.json {{ add_header Cache-Control no-cache; }}\n"
            f"}}\n}}\n")


@contextmanager
def static_host(kind: str, root: Path, work: Path):
    """nginx (its own config, pid, logs and temp folders in ``work``; in the foreground) or
    Python's http.server, serving ``root``; stopped after."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if kind == "nginx":
        if NGINX is None:
            pytest.skip("nginx is not installed (apt-get install -y nginx)")
        conf = work / "nginx.conf"
        conf.write_text(_nginx_conf(root, port, work))
        cmd = [NGINX, "-c", str(conf), "-p", str(work), "-e", str(work / "error.log")]
        log = work / "access.log"
        out = open(work / "nginx.out", "wb")  # noqa: SIM115 (closed below)
    else:
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(root)]
        log = work / "http.server.log"
        out = open(log, "wb")  # noqa: SIM115 (it logs each request on stderr)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                errors = (work / "error.log") if kind == "nginx" else log
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"{kind} did not start: " + (errors.read_text() if errors.exists() else "")
                time.sleep(0.05)
        yield StaticHost(proc, port, log)
    finally:
        proc.terminate()  # nginx: SIGTERM is its fast shutdown
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        out.close()


@pytest.fixture(params=["nginx", "http.server"])
def static_kind(request) -> str:
    return request.param


# -- a TUF client reading the published folder, as a device does ------------------------------

def tuf_view(base_url: str, root: Path, cache: Path) -> dict:
    """Refresh from ``base_url`` with ngclient (caching in ``cache``, bootstrapped from
    ``root``) and download every target the verified metadata names, each checked against
    its signed length and hashes. Returns {"targets_version": n, "targets": [paths]};
    raises whatever ngclient raises when the view is not whole."""
    from tuf.api.metadata import Metadata
    from tuf.ngclient import Updater

    (cache / "meta").mkdir(parents=True, exist_ok=True)
    (cache / "files").mkdir(exist_ok=True)
    bootstrap = None if (cache / "meta" / "root.json").exists() else root.read_bytes()
    updater = Updater(metadata_dir=str(cache / "meta"), metadata_base_url=f"{base_url}/metadata/",
                      target_dir=str(cache / "files"), target_base_url=f"{base_url}/targets/",
                      fetcher=Fetcher(10.0), bootstrap=bootstrap)
    updater.refresh()
    targets = Metadata.from_file(str(cache / "meta" / "targets.json")).signed
    for path in targets.targets:
        info = updater.get_targetinfo(path)
        out = cache / "files" / path.replace("/", "_")
        out.unlink(missing_ok=True)
        updater.download_target(info, str(out))
    return {"targets_version": targets.version, "targets": sorted(targets.targets)}


def _sync(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_outpost("fleet", "sync", *args, env=env)


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, \
        out.stderr
    for w in words:
        assert w in out.stderr, out.stderr


def _status(fleet: Fleet) -> list[dict]:
    with urllib.request.urlopen(f"{fleet.url}/v1/status", timeout=10) as resp:
        return json.loads(resp.read())


def _devices_of(fleet: Fleet, version: int) -> dict:
    return next(r["devices"] for r in _status(fleet) if r["version"] == version)


def _targets_version(fleet: Fleet) -> int:
    return fleet.repo._load("targets").signed.version


def _another_release(fleet: Fleet, version: int) -> None:
    """A release target of its own bytes (never rolled out: no device installs it)."""
    fleet.repo.publish_archive("identity", version, f"release {version}\n".encode() * 4000)


def _point_device_at(config: Path, fleet: Fleet, files_url: str, report_url: str) -> Path:
    """The device takes metadata and targets from ``files_url``, reports to ``report_url``."""
    text = config.read_text().replace(f'fleet_url = "{fleet.url}"',
                                      f'fleet_url = "{files_url}"\n'
                                      f'report_url = "{report_url}"')
    config.write_text(text)
    return config


@pytest.fixture
def fleet(tmp_path, demo_files):
    """identity 1 rolled out to every device, identity 2 published; the server running."""
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 1, demo_files["identity"])
    f.repo.set_rollout("identity", 1, new=True, fraction=1.0)
    f.publish("identity", 2, demo_files["identity"])
    yield f
    f.stop()


# -- devices update from the static host ---------------------------------------------------------

def test_a_device_updates_from_a_static_host_and_reports_to_the_fleet_server(
        static_kind, fleet, tmp_path, short_tmp, demo_files):
    fleet.start()  # takes the reports; the device never asks it for a file
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    dest = tmp_path / "www"
    dest.mkdir()
    out = _sync(fleet.dir, dest)
    assert out.returncode == 0 and "timestamp version" in out.stdout, out.stderr
    # http.server's run also names the report endpoint in full (both forms are taken)
    report_url = fleet.url + ("/v1/reports" if static_kind == "http.server" else "")
    release = fleet.repo.target_file("releases/identity/2.tar").name
    with static_host(static_kind, dest, tmp_path / static_kind) as host:
        config = _point_device_at(make_device(short_tmp / "dev", fleet, demo_files["identity"]),
                                  fleet, host.url, report_url)
        out = run_outpost("update", "check", "--config", config)
        assert out.returncode == 0, out.stderr
        assert "identity 1 -> 2: committed" in out.stdout, out.stdout
        served = host.requests()
    # the files came from the static host: the timestamp, and the release by its hashed name
    assert "GET /metadata/timestamp.json" in served, served
    assert f"GET /targets/releases/identity/{release}" in served, served
    assert "POST" not in served  # and not one report went there
    # the reports reached the fleet server: its status has the device's commit
    assert _devices_of(fleet, 2) == {"committed": 1}
    devices = json.loads(run_outpost("fleet", "devices", fleet.dir, "--json").stdout)
    assert [(d["device_id"], d["version"], d["state"]) for d in devices] == \
        [("dev-1", 2, "committed")]


def test_fleet_serve_sync_to_carries_a_stage_advance_to_the_static_host(
        fleet, tmp_path, short_tmp, demo_files):
    """A planned rollout the fleet server advances by itself reaches devices that read only
    the static host: `fleet serve --sync-to` publishes each re-sign."""
    dest = tmp_path / "www"
    dest.mkdir()
    fleet.start("--sync-to", str(dest), "--plan-check-s", "0.2")
    source_ts = fleet.dir / "metadata" / "timestamp.json"
    published_ts = dest / "metadata" / "timestamp.json"
    wait_for(lambda: published_ts.exists() and published_ts.read_bytes() == source_ts.read_bytes(),
             30, "the first sync at start")
    # a command run beside the server re-signs; the server publishes it
    out = run_outpost("fleet", "rollout", fleet.dir, "identity", "2", "--plan", "50,100",
                      "--soak", "1s", "--min-committed", "1")
    assert out.returncode == 0, out.stderr
    rollout_id = fleet.repo.release("identity", 2).rollout.id
    ids = [f"dev-{i}" for i in range(64)]
    first = next(d for d in ids if cohort_point(rollout_id, d) < 0.5)
    later = next(d for d in ids if cohort_point(rollout_id, d) >= 0.5)

    with static_host("nginx" if NGINX else "http.server", dest, tmp_path / "host") as host:
        configs = {}
        for device in (first, later):
            data = short_tmp / device
            configs[device] = _point_device_at(
                make_device(data, fleet, demo_files["identity"], device_id=device),
                fleet, host.url, fleet.url)
        # the later device is outside the first stage: nothing for it yet
        out = run_outpost("update", "check", "--config", configs[later])
        assert out.returncode == 0 and "up to date" in out.stdout, (out.stdout, out.stderr)
        # the first stage's device takes it from the static host (the sync reached it)
        out = wait_for(lambda: _committed(configs[first]), 60, "the first stage's device")
        # its commit, reported to the fleet server, lets the plan advance to 100%; the
        # re-signed metadata reaches the static host, and with it the later device
        wait_for(lambda: _committed(configs[later]), 90, "the advance to reach the host")
    assert _devices_of(fleet, 2) == {"committed": 2}
    assert fleet.repo.release("identity", 2).rollout.fraction == 1.0
    assert "advanced to 100%" in (fleet.dir / "server.log").read_text()


def _committed(config: Path) -> bool:
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 0, out.stderr
    if "up to date" in out.stdout:
        time.sleep(0.5)  # the fleet's word has not reached the host yet
        return False
    assert "identity 1 -> 2: committed" in out.stdout, out.stdout
    return True


# -- the order of a sync, interrupted anywhere ---------------------------------------------------

def test_a_sync_killed_at_any_point_leaves_a_view_whose_files_are_all_there(
        fleet, tmp_path, demo_files):
    """SIGKILL `fleet sync` after each file it writes (and in the middle of copying one):
    a TUF client, fresh or one that read the old view, always gets a whole view, the old
    one until the timestamp is written and the new one from then on; a rerun finishes it."""
    published = tmp_path / "published"  # one http.server over every case's folder
    published.mkdir()
    before = published / "before"
    before.mkdir()
    assert _sync(fleet.dir, before).returncode == 0
    old_files = {p.relative_to(before).as_posix() for p in before.rglob("*") if p.is_file()}
    old_version = _targets_version(fleet)
    # the change: two new releases, and a rollout
    for version in (3, 4):
        _another_release(fleet, version)
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    new_version = _targets_version(fleet)
    view = read_view(FleetRepo(fleet.dir))
    new_targets = [f"targets/{t.name}" for t in view.targets
                   if f"targets/{t.name}" not in old_files]
    new_metadata = [f"metadata/{n}" for n, _ in view.metadata
                    if f"metadata/{n}" not in old_files]
    assert len(new_targets) == 2 and new_metadata == [
        f"metadata/{new_version}.targets.json", f"metadata/{new_version}.snapshot.json"]
    points = [*(p for t in new_targets for p in (f"sync:partial:{t}", f"sync:after:{t}")),
              "sync:phase:targets", *(f"sync:after:{m}" for m in new_metadata),
              "sync:phase:metadata", "sync:phase:timestamp"]
    flips_at = points.index("sync:phase:timestamp")  # the first point past the timestamp

    with static_host("http.server", published, tmp_path / "host") as host:
        # a client that read the old view before the sync starts
        old_client = tmp_path / "clients" / "old"
        assert tuf_view(f"{host.url}/before", fleet.root, old_client)["targets_version"] \
            == old_version
        for i, point in enumerate(points):
            case = published / f"case{i}"
            shutil.copytree(before, case)
            out = _sync(fleet.dir, case, "--prune", env={FAULT_ENV: point})
            assert out.returncode == -signal.SIGKILL, (point, out.stdout, out.stderr)
            want = old_version if i < flips_at else new_version
            fresh = tuf_view(f"{host.url}/case{i}", fleet.root, tmp_path / "clients" / f"f{i}")
            assert fresh["targets_version"] == want, point
            cached = tmp_path / "clients" / f"c{i}"
            shutil.copytree(old_client, cached)
            assert tuf_view(f"{host.url}/case{i}", fleet.root, cached)["targets_version"] \
                == want, point
            temps = [p for p in case.rglob(f"*{TMP_SUFFIX}")]
            assert bool(temps) == point.startswith("sync:partial:"), (point, temps)

        # a rerun finishes any of them: the new view, no temp file left
        last = published / f"case{len(points) - 2}"
        out = _sync(fleet.dir, last)
        assert out.returncode == 0, out.stderr
        assert tuf_view(f"{host.url}/case{len(points) - 2}", fleet.root,
                        tmp_path / "clients" / "rerun")["targets_version"] == new_version
        assert not list(last.rglob(f"*{TMP_SUFFIX}"))

        # the check itself catches the wrong order: metadata published before its files
        wrong = published / "wrong"
        shutil.copytree(published / f"case{len(points) - 1}", wrong)
        (wrong / new_targets[0]).unlink()
        from tuf.api.exceptions import DownloadError
        with pytest.raises(DownloadError):
            tuf_view(f"{host.url}/wrong", fleet.root, tmp_path / "clients" / "wrong")


def test_prune_removes_only_files_no_metadata_names_and_only_after_the_timestamp(
        fleet, tmp_path):
    dest = tmp_path / "www"
    dest.mkdir()
    stale = dest / "targets" / "releases" / "old" / "abc.1.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a release no metadata names")
    # killed right after the timestamp: nothing pruned yet
    out = _sync(fleet.dir, dest, "--prune", env={FAULT_ENV: "sync:phase:timestamp"})
    assert out.returncode == -signal.SIGKILL and stale.exists()
    out = _sync(fleet.dir, dest, "--prune")
    assert out.returncode == 0 and "stale target files 1 pruned" in out.stdout, out.stdout
    assert not stale.exists() and not stale.parent.exists()
    names = {p.name for p in (dest / "targets" / "releases" / "identity").iterdir()}
    assert names == {fleet.repo.target_file(f"releases/identity/{v}.tar").name for v in (1, 2)}


# -- bad input -----------------------------------------------------------------------------------

def test_sync_refuses_a_bad_dest_or_dir_in_one_line(fleet, tmp_path):
    dest = tmp_path / "www"
    dest.mkdir()
    _one_line_error(_sync(fleet.dir, tmp_path / "missing"), "no such folder", "mkdir -p")
    (tmp_path / "afile").write_text("x")
    _one_line_error(_sync(fleet.dir, tmp_path / "afile"), "not a folder")
    _one_line_error(_sync(tmp_path / "nofleet", dest), "not a fleet repository",
                    "outpost fleet init")
    _one_line_error(_sync(fleet.dir, fleet.dir), "lies in the fleet repository", "keys")
    _one_line_error(_sync(fleet.dir, fleet.dir / "targets"), "lies in the fleet repository")
    _one_line_error(_sync(fleet.dir, "s3://bucket/fleet"), "writes to a folder",
                    "then metadata/ but timestamp.json")
    _one_line_error(_sync(fleet.dir, "file://otherhost/srv"), "file:///absolute/path")
    other = Fleet(tmp_path / "other")
    assert _sync(other.dir, dest).returncode == 0
    _one_line_error(_sync(fleet.dir, dest), "another fleet's repository")
    assert _sync(fleet.dir, f"file://{tmp_path / 'missing'}").returncode == 1
    # fleet serve --sync-to checks DEST before it starts
    out = run_outpost("fleet", "serve", fleet.dir, "--port", str(free_port()),
                      "--sync-to", str(tmp_path / "missing"))
    _one_line_error(out, "no such folder")
    if os.geteuid() != 0:  # root writes through any mode bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        _one_line_error(_sync(fleet.dir, locked), "can't write")


def test_a_sync_that_fails_midway_leaves_the_published_view_whole(fleet, tmp_path):
    """A write that fails in the targets phase (here a folder where a release must go; a
    full or read-only disk fails the same way), and a source file damaged on disk: one line,
    and devices keep reading the view published before, every file of it there."""
    dest = tmp_path / "www"
    dest.mkdir()
    assert _sync(fleet.dir, dest).returncode == 0
    before = (dest / "metadata" / "timestamp.json").read_bytes()
    old_version = _targets_version(fleet)
    _another_release(fleet, 3)
    new = Path("targets/releases/identity") / fleet.repo.target_file(
        "releases/identity/3.tar").name
    (dest / new).mkdir(parents=True)  # something in the way of the new release
    out = _sync(fleet.dir, dest)
    _one_line_error(out, f"stopped at {new.as_posix()}", "view published before")
    assert (dest / "metadata" / "timestamp.json").read_bytes() == before
    with static_host("http.server", dest, tmp_path / "host") as host:
        assert tuf_view(host.url, fleet.root, tmp_path / "c1")["targets_version"] == old_version
        (dest / new).rmdir()
        # a source file damaged on disk (its length kept): refused, nothing new published
        damaged = fleet.dir / new
        data = bytearray(damaged.read_bytes())
        data[100] ^= 0xFF
        damaged.write_bytes(bytes(data))
        _one_line_error(_sync(fleet.dir, dest), "does not match what", "damaged")
        assert (dest / "metadata" / "timestamp.json").read_bytes() == before
        assert not (dest / new).exists() and not list(dest.rglob(f"*{TMP_SUFFIX}"))
        assert tuf_view(host.url, fleet.root, tmp_path / "c2")["targets_version"] == old_version
        damaged.unlink()  # a file the metadata names, gone
        _one_line_error(_sync(fleet.dir, dest), "missing", "nothing was published")
    assert (dest / LOCK_NAME).exists() and not (dest / "metadata" / LOCK_NAME).exists()


@pytest.mark.parametrize(("key", "value", "words"), [
    ("report_url", "ftp://fleet.example.com", "not an http:// or https:// URL"),
    ("report_url", "fleet.example.com:8470", "not an http:// or https:// URL"),
    ("report_url", "http://", "no host"),
    ("report_url", "http://fleet.example.com:99999", "Port out of range"),
    ("report_url", "http://fleet.example.com/?token=1", "a base URL takes no query"),
    ("report_url", "http://admin:secret@fleet.example.com", "a user name or password"),
    ("report_url", "http://fleet example.com", "it holds a space"),
    ("fleet_url", "https://cdn.example.com:0/fleet", "port 0"),
    ("fleet_url", "s3://bucket/fleet", "not an http:// or https:// URL"),
])
def test_a_bad_fleet_or_report_url_is_one_clear_error(fleet, short_tmp, demo_files, key,
                                                     value, words):
    config = make_device(short_tmp / "dev", fleet, demo_files["identity"])
    text = config.read_text()
    if key == "fleet_url":
        text = text.replace(f'fleet_url = "{fleet.url}"', f'fleet_url = "{value}"')
    else:
        text = text.replace("[updater]\n", f'[updater]\nreport_url = "{value}"\n')
    config.write_text(text)
    out = run_outpost("update", "check", "--config", config)
    assert out.returncode == 2, (out.stdout, out.stderr)
    shown = value.replace("admin:secret@", "***@")  # never the password
    assert f"updater.{key} {shown!r}: {words}" in out.stderr, out.stderr
    assert "secret" not in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
