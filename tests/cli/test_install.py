"""`outpost install`: into a temporary root, through the real command line.

A stand-in build folder (an `outpost` script that prints its version, and an `_internal`
folder) plays the frozen build; the frozen build itself is installed by
build/smoke_test.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config.load import load_config
from appliance.deploy.install import Options, check_can_apply, render_unit, unit_file
from appliance.errors import FailedPrecondition

ROOT = Path(__file__).resolve().parent.parent.parent


def outpost(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


def fake_build(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True)
    exe = folder / "outpost"
    exe.write_text(f"#!/bin/sh\necho outpost {version}\n")
    exe.chmod(0o755)
    (folder / "_internal").mkdir()
    (folder / "_internal" / "libpython.so").write_bytes(b"\0" * 64)
    return folder


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_lists_the_steps_and_changes_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    build = fake_build(tmp_path / "dist", "1.2.3")
    r = outpost("install", "--root", str(root), "--from", str(build), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "none done" in r.stdout
    assert f"{root}/opt/outpost/1.2.3" in r.stdout
    assert f"{root}/etc/systemd/system/outpost.service" in r.stdout
    assert tree(root) == []


def test_install_into_a_root(tmp_path):
    root = tmp_path / "root"
    build = fake_build(tmp_path / "dist", "1.2.3")
    r = outpost("install", "--root", str(root), "--from", str(build))
    assert r.returncode == 0, r.stderr
    assert "nothing on this system was changed" in r.stdout

    app = root / "opt/outpost/1.2.3"
    assert (app / "outpost").read_text() == (build / "outpost").read_text()
    assert os.access(app / "outpost", os.X_OK)
    assert (app / "_internal/libpython.so").stat().st_size == 64
    assert os.readlink(root / "opt/outpost/current") == "1.2.3"
    assert os.readlink(root / "usr/local/bin/outpost") == "/opt/outpost/current/outpost"
    assert "u outpost - " in (root / "etc/sysusers.d/outpost.conf").read_text()

    unit = (root / "etc/systemd/system/outpost.service").read_text()
    for line in ("User=outpost", "Restart=on-failure", "StateDirectory=outpost",
                 "RuntimeDirectory=outpost", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ExecStart=/opt/outpost/current/outpost serve --config "
                 "/etc/outpost/config.toml"):
        assert line in unit.splitlines()

    # The default config is valid and puts state and socket where the unit provides them.
    config = load_config(root / "etc/outpost/config.toml")
    assert config.data_dir == "/var/lib/outpost"
    assert config.server.socket_path == "/run/outpost/outpost.sock"
    assert config.logging.format == "json"


def test_upgrade_switches_current_and_keeps_the_config(tmp_path):
    root = tmp_path / "root"
    assert outpost("install", "--root", str(root), "--from",
                   str(fake_build(tmp_path / "v1", "1.0.0"))).returncode == 0
    config = root / "etc/outpost/config.toml"
    config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))

    r = outpost("install", "--root", str(root), "--from", str(fake_build(tmp_path / "v2",
                                                                          "1.1.0")))
    assert r.returncode == 0, r.stderr
    assert "keep the existing config" in r.stdout
    assert os.readlink(root / "opt/outpost/current") == "1.1.0"
    assert (root / "opt/outpost/1.0.0/outpost").exists()  # the old one stays, for rollback
    assert load_config(config).logging.level == "debug"
    # the same version again replaces its folder whole
    r = outpost("install", "--root", str(root), "--from", str(tmp_path / "v2"))
    assert r.returncode == 0, r.stderr
    assert not [p for p in (root / "opt/outpost").iterdir() if p.name.startswith(".")]


def test_a_broken_existing_config_stops_the_install_before_anything_changes(tmp_path):
    root = tmp_path / "root"
    (root / "etc/outpost").mkdir(parents=True)
    (root / "etc/outpost/config.toml").write_text('[server]\nsocket_mode = "rw"\n')
    r = outpost("install", "--root", str(root), "--from", str(fake_build(tmp_path / "d",
                                                                         "1.0.0")))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1
    assert "socket_mode" in r.stderr and "--force-config" in r.stderr
    assert tree(root) == ["etc", "etc/outpost", "etc/outpost/config.toml"]

    r = outpost("install", "--root", str(root), "--from", str(tmp_path / "d"),
                "--force-config")
    assert r.returncode == 0, r.stderr
    assert load_config(root / "etc/outpost/config.toml").server.socket_mode == "0660"


@pytest.mark.parametrize("case", ["empty folder", "not outpost", "bad user"])
def test_bad_arguments_get_one_clear_line(tmp_path, case):
    root = tmp_path / "root"
    args = ["install", "--root", str(root)]
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        args += ["--from", str(tmp_path / "empty")]
        expected = "no 'outpost' executable there"
    elif case == "not outpost":
        build = fake_build(tmp_path / "other", "1.0")
        (build / "outpost").write_text("#!/bin/sh\necho hello\n")
        args += ["--from", str(build)]
        expected = "is this an outpost build?"
    else:
        args += ["--user", "Root Admin"]
        expected = "not a valid system user name"
    r = outpost(*args)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert expected in r.stderr and r.stderr.startswith("outpost: INVALID_ARGUMENT")
    assert not root.exists()


def test_a_live_install_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(FailedPrecondition, match="needs root"):
        check_can_apply(Options(root=Path("/")))
    check_can_apply(Options(root=Path("/tmp/somewhere")))  # a folder needs no root


def test_video_group_joins_the_unit_where_the_system_has_it(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    assert outpost("install", "--root", str(root), "--from",
                   str(fake_build(tmp_path / "d", "1.0.0"))).returncode == 0
    unit = (root / "etc/systemd/system/outpost.service").read_text()
    assert "SupplementaryGroups=video" in unit.splitlines()


def test_the_shipped_unit_is_the_one_install_writes():
    shipped = (ROOT / "appliance/deploy/outpost.service").read_text()
    assert unit_file() == ROOT / "appliance/deploy/outpost.service"
    assert shipped == render_unit("/opt/outpost/current/outpost")
    assert outpost("install", "--print-unit").stdout == shipped
    # Another user and executable change those lines, and only those.
    other = render_unit("/usr/bin/python3 -m appliance", "edge", video_group=True)
    changed = {line for line in other.splitlines() if line not in shipped.splitlines()}
    assert changed == {"User=edge", "Group=edge", "SupplementaryGroups=video",
                       "ExecStart=/usr/bin/python3 -m appliance serve --config "
                       "/etc/outpost/config.toml"}
    assert len(other.splitlines()) == len(shipped.splitlines()) + 1


def test_the_frozen_app_finds_its_bundled_unit(tmp_path, monkeypatch):
    # build/outpost.spec bundles the unit under appliance/deploy/ in sys._MEIPASS.
    from appliance.deploy import install

    bundled = tmp_path / "bundle/appliance/deploy/outpost.service"
    bundled.parent.mkdir(parents=True)
    bundled.write_text((ROOT / "appliance/deploy/outpost.service").read_text())
    monkeypatch.setattr(install, "__file__", str(tmp_path / "frozen/install.pyc"))
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path / "bundle"), raising=False)
    assert unit_file() == bundled
    assert render_unit("/opt/outpost/current/outpost") == bundled.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path):
    exe = fake_build(tmp_path / "d", "1.0.0") / "outpost"
    unit = tmp_path / "outpost.service"
    unit.write_text(render_unit(str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # unknown keys only warn


def test_a_step_that_fails_stops_the_install_with_one_line(tmp_path):
    root = tmp_path / "root"
    root.write_text("a file where the root folder should be")
    r = outpost("install", "--root", str(root), "--from",
                str(fake_build(tmp_path / "d", "1.0.0")))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("outpost: FAILED_PRECONDITION: install stopped at 'copy the build")
    assert root.read_text() == "a file where the root folder should be"
