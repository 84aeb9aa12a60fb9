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


# -- what the unit's sandboxing lets the service see (appliance/deploy/sandbox.py) -----------


def _verify(unit: Path, root: Path | None = None) -> subprocess.CompletedProcess:
    args = ["systemd-analyze", "verify", *([f"--root={root}"] if root else []), str(unit)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


NO_SYSTEMD_ANALYZE = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is absent: install Debian's 'systemd' package to run this")


@NO_SYSTEMD_ANALYZE
def test_a_frozen_install_verifies_inside_its_root(tmp_path):
    root = tmp_path / "root"
    build = fake_build(tmp_path / "dist", "1.2.3")
    r = outpost("install", "--root", str(root), "--from", str(build))
    assert r.returncode == 0, r.stderr
    assert "paths the service needs against the unit's sandboxing" in r.stdout
    # systemd's own units, so that verify resolves the unit's dependencies in the root
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    v = _verify(Path("/etc/systemd/system/outpost.service"), root)
    assert v.returncode == 0 and v.stderr == "", v.stderr
    (root / "opt/outpost/1.2.3/outpost").unlink()  # verify does look at ExecStart in there
    assert "is not executable" in _verify(Path("/etc/systemd/system/outpost.service"),
                                          root).stderr


@NO_SYSTEMD_ANALYZE
def test_a_source_install_is_checked_against_the_units_sandboxing(tmp_path):
    """systemd-analyze verify accepts a unit whose interpreter the sandbox hides (it looks
    at the host, unsandboxed); the install's own check is what refuses it."""
    import shlex

    from appliance.deploy import sandbox
    from appliance.paths import outpost_command

    text = render_unit(shlex.join(outpost_command()))
    unit = tmp_path / "outpost.service"
    unit.write_text(text)
    v = _verify(unit)
    assert v.returncode == 0, v.stderr
    expected = sandbox.problems(text, sandbox.source_needs(), check_access=True)
    root = tmp_path / "root"
    r = outpost("install", "--root", str(root))
    if expected:  # this checkout's Python lies where the service can't see it
        assert r.returncode == 1 and not root.exists()
        assert r.stderr.startswith("outpost: FAILED_PRECONDITION: the service could not "
                                   "start from this source checkout: ")
        assert expected[0] in r.stderr and "--from dist/outpost" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    else:  # a Python the service can reach: the unit runs it
        assert r.returncode == 0, r.stderr
        written = (root / "etc/systemd/system/outpost.service").read_text()
        assert f"ExecStart={shlex.join(outpost_command())} serve" in written


@pytest.mark.parametrize(("path", "write", "why"), [
    ("/root/.pyenv/versions/3.11.7/bin/python3.11", False, "under /root, which the unit's "
                                                          "ProtectHome=yes hides"),
    ("/home/dev/venv/bin/python", False, "under /home, which the unit's ProtectHome=yes"),
    ("/tmp/venv/bin/python", False, "under /tmp, which the unit's PrivateTmp=yes replaces"),
    ("/var/tmp/x/outpost", False, "PrivateTmp=yes"),
    ("/opt/data", True, "ProtectSystem=strict makes it read-only"),
    ("/usr/bin/python3", False, None),
    ("/opt/outpost/current/outpost", False, None),
    ("/var/lib/outpost", True, None),  # StateDirectory=outpost
    ("/run/outpost", True, None),  # RuntimeDirectory=outpost
])
def test_the_units_sandboxing_decides_what_the_service_sees(path, write, why):
    from appliance.deploy.sandbox import Needed, sandbox_problem, service_settings

    settings = service_settings(unit_file().read_text())
    problem = sandbox_problem(settings, Needed(Path(path), "test", write=write))
    assert problem is None if why is None else why in problem


def test_an_unwritable_root_stops_the_install_before_its_first_step(tmp_path):
    probe = Path("/sys/outpost-install-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here: no unwritable folder to install into")
    r = outpost("install", "--root", "/sys/outpost-root", "--from",
                str(fake_build(tmp_path / "d", "1.0.0")))
    assert r.returncode == 1
    assert r.stderr.startswith("outpost: FAILED_PRECONDITION: --root /sys/outpost-root: "
                               "can't write there (/sys: ")
    assert "install into a folder you can write to" in r.stderr
    assert "copy the build" not in r.stdout  # no step began


def test_a_hand_edited_unit_is_replaced_and_kept_beside_the_config(tmp_path):
    root = tmp_path / "root"
    build = fake_build(tmp_path / "dist", "1.2.3")
    assert outpost("install", "--root", str(root), "--from", str(build)).returncode == 0
    unit = root / "etc/systemd/system/outpost.service"
    fresh = unit.read_text()
    unit.write_text(fresh.replace("RestartSec=2s", "RestartSec=30s"))
    r = outpost("install", "--root", str(root), "--from", str(build))
    assert r.returncode == 0, r.stderr
    assert unit.read_text() == fresh  # replaced: the unit is outpost's
    kept = root / "etc/outpost/outpost.service.replaced"
    assert "RestartSec=30s" in kept.read_text()
    assert f"the old one is kept as {kept}" in r.stdout and "systemctl edit outpost" in r.stdout
    r = outpost("install", "--root", str(root), "--from", str(build))
    assert "replace" not in r.stdout  # unchanged since: nothing to keep
