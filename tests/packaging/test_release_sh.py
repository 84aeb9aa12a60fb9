"""build/release.sh and build/release_smoke.sh: what they refuse, before anything is built.

The whole release build (debootstrap, CPython, freeze, smoke in a bullseye root) is run
by .ci/run, not here: these are its bad inputs, each one clear line, with nothing left in
the output folder. A host missing qemu or binfmt_misc is simulated through PATH and
$OUTPOST_BINFMT_DIR; an unreachable Debian archive is a closed port on 127.0.0.1.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "build" / "release.sh"
SMOKE = ROOT / "build" / "release_smoke.sh"

x86_host = pytest.mark.skipif(platform.machine() != "x86_64",
                              reason="release builds run on an x86_64 host")


def run(script: Path, *args: str, env: dict[str, str] | None = None,
        path: str | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    if path is not None:
        full["PATH"] = path
    return subprocess.run([shutil.which("bash") or "/bin/bash", str(script), *args],
                          capture_output=True, text=True, timeout=120, env=full, check=False)


def one_clear_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "line " not in lines[0], r.stderr
    return lines[0]


def tools_only(tmp_path: Path, *names: str) -> str:
    """A PATH holding only these host tools (links to the real ones)."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in names:
        real = shutil.which(name)
        if real is None:
            pytest.skip(f"{name} is not installed here")
        (folder / name).symlink_to(real)
    return str(folder)


BASIC = ("bash", "dirname", "uname", "id", "head", "mkdir", "date", "sed")


@pytest.mark.parametrize("args, says", [
    ((), "which ARCH?"),
    (("sparc",), "unknown ARCH 'sparc': use x86_64 or aarch64"),
    (("x86_64", "aarch64"), "one ARCH only"),
    (("x86_64", "--fast"), "unknown option '--fast'"),
    (("x86_64", "--out"), "--out needs a folder"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, says):
    r = run(RELEASE, *args)
    assert r.returncode == 2
    assert says in one_clear_line(r)
    assert r.stdout == ""


def test_help_describes_the_command():
    r = run(RELEASE, "--help")
    assert r.returncode == 0
    assert "build/release.sh ARCH" in r.stdout and "glibc 2.31" in r.stdout


@x86_host
def test_aarch64_without_qemu_names_the_package(tmp_path):
    r = run(RELEASE, "aarch64", "--out", str(tmp_path / "dist"),
            path=tools_only(tmp_path, *BASIC))
    assert r.returncode == 1
    line = one_clear_line(r)
    assert "qemu-aarch64-static" in line
    assert "apt-get install -y qemu-user-static binfmt-support" in line
    assert not (tmp_path / "dist").exists()


@x86_host
def test_aarch64_without_binfmt_misc_names_the_mount(tmp_path):
    path = tools_only(tmp_path, *BASIC, "qemu-aarch64-static")
    unmounted = tmp_path / "binfmt_misc"
    unmounted.mkdir()
    r = run(RELEASE, "aarch64", env={"OUTPOST_BINFMT_DIR": str(unmounted)}, path=path)
    assert r.returncode == 1
    line = one_clear_line(r)
    assert f"mount -t binfmt_misc binfmt_misc {unmounted}" in line
    assert "update-binfmts --enable qemu-aarch64" in line


@x86_host
def test_aarch64_with_qemu_not_registered_says_how(tmp_path):
    path = tools_only(tmp_path, *BASIC, "qemu-aarch64-static")
    mounted = tmp_path / "binfmt_misc"
    mounted.mkdir()
    (mounted / "register").write_text("")
    r = run(RELEASE, "aarch64", env={"OUTPOST_BINFMT_DIR": str(mounted)}, path=path)
    assert r.returncode == 1
    line = one_clear_line(r)
    assert "qemu-aarch64 is not registered" in line and "binfmt-support" in line
    # registered but disabled: the same line
    (mounted / "qemu-aarch64").write_text("disabled\ninterpreter /usr/bin/qemu-aarch64-static\n")
    r = run(RELEASE, "aarch64", env={"OUTPOST_BINFMT_DIR": str(mounted)}, path=path)
    assert "qemu-aarch64 is not registered" in one_clear_line(r)


@x86_host
def test_without_debootstrap_names_the_package(tmp_path):
    r = run(RELEASE, "x86_64", path=tools_only(tmp_path, *BASIC))
    assert r.returncode == 1
    assert "apt-get install -y debootstrap" in one_clear_line(r)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when this returns: nothing listens there


@x86_host
def test_an_unreachable_debian_archive_stops_before_anything_is_built(tmp_path):
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("needs root and debootstrap (the host checks pass first); .ci/run "
                    "installs debootstrap before it runs the release tests")
    mirror = f"http://127.0.0.1:{_closed_port()}/debian"
    out, cache = tmp_path / "dist", tmp_path / "cache"
    out.mkdir()
    (out / "kept.txt").write_text("an earlier file")
    r = run(RELEASE, "x86_64", "--out", str(out),
            env={"OUTPOST_DEBIAN_MIRROR": mirror, "OUTPOST_RELEASE_CACHE": str(cache)})
    assert r.returncode == 1
    line = one_clear_line(r)
    assert "Debian's archive is not reachable" in line
    assert f"{mirror}/dists/bullseye/Release" in line and "OUTPOST_DEBIAN_MIRROR" in line
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]  # nothing half-built
    assert not any(p.name.startswith("bullseye-") for p in cache.iterdir())


# --- release_smoke.sh: a release is checked before it is unpacked or run ---------------

def _release(tmp_path: Path, arch: str = "x86_64") -> Path:
    tarball = tmp_path / f"outpost-1.2.3-linux-{arch}.tar.gz"
    tarball.write_bytes(b"\x1f\x8b not really a release")
    digest = subprocess.run(["sha256sum", tarball.name], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout
    (tmp_path / f"{tarball.name}.sha256").write_text(digest)
    return tarball


def test_smoke_refuses_a_release_whose_checksum_does_not_match(tmp_path):
    tarball = _release(tmp_path)
    with open(tarball, "ab") as f:
        f.write(b"!")
    r = run(SMOKE, str(tarball))
    assert r.returncode == 1
    line = one_clear_line(r)
    assert "does not match its outpost-1.2.3-linux-x86_64.tar.gz.sha256" in line
    assert "fetch both again" in line


def test_smoke_refuses_a_release_without_its_checksum(tmp_path):
    tarball = _release(tmp_path)
    Path(f"{tarball}.sha256").unlink()
    r = run(SMOKE, str(tarball))
    assert r.returncode == 1
    assert "no " in one_clear_line(r) and ".sha256 beside it" in r.stderr


@pytest.mark.parametrize("name, says", [
    ("outpost.tar.gz", "is not named outpost-VERSION-linux-ARCH.tar.gz"),
    ("outpost-1.2.3-linux-riscv64.tar.gz", "is not named outpost-VERSION-linux-ARCH.tar.gz"),
])
def test_smoke_refuses_what_is_not_a_release(tmp_path, name, says):
    (tmp_path / name).write_bytes(b"x")
    r = run(SMOKE, str(tmp_path / name))
    assert r.returncode == 2
    assert says in one_clear_line(r)


def test_smoke_bad_arguments(tmp_path):
    assert "which release?" in one_clear_line(run(SMOKE))
    r = run(SMOKE, str(tmp_path / "outpost-1-linux-x86_64.tar.gz"))
    assert r.returncode == 2 and "no such file" in one_clear_line(r)
    r = run(SMOKE, "--slow", "x.tar.gz")
    assert r.returncode == 2 and "unknown option '--slow'" in one_clear_line(r)
