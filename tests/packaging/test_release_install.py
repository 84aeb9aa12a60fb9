"""`outpost install --from outpost-VERSION-linux-ARCH.tar.gz`: a release tarball is
installed only when it matches the SHA-256 beside it, through the real command line.

The tarball holds a stand-in build (an `outpost` script that prints its version), as in
tests/cli/test_install.py; build/release_smoke.sh installs a real release the same way in
a bullseye root, and refuses a tampered copy of it.
"""

from __future__ import annotations

import hashlib
import io
import platform
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCH = platform.machine()


def outpost(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, check=False)


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", mode: int = 0o644,
         kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def release(folder: Path, version: str = "1.2.3", arch: str = ARCH,
            extra=lambda tar, top: None) -> Path:
    """A release tarball of a stand-in build, and its .sha256 in sha256sum's format."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"outpost-{version}-linux-{arch}"
    tarball = folder / f"{name}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        _add(tar, name, kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{name}/outpost", f"#!/bin/sh\necho outpost {version}\n".encode(), 0o755)
        _add(tar, f"{name}/_internal", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{name}/_internal/libpython3.11.so.1.0", b"\0" * 64)
        _add(tar, f"{name}/_internal/libpython3.11.so", kind=tarfile.SYMTYPE,
             link="libpython3.11.so.1.0")
        extra(tar, name)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    Path(f"{tarball}.sha256").write_text(f"{digest}  {tarball.name}\n")
    return tarball


def installed(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def no_traceback(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_release_that_matches_its_checksum_installs(tmp_path):
    tarball = release(tmp_path / "dl")
    root = tmp_path / "root"
    r = outpost("install", "--root", str(root), "--from", str(tarball))
    assert r.returncode == 0, r.stderr
    assert f"{tarball} matches its .sha256" in r.stdout
    exe = root / "opt/outpost/1.2.3/outpost"
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout == "outpost 1.2.3\n"
    assert (root / "opt/outpost/1.2.3/_internal/libpython3.11.so").is_symlink()
    assert (root / "opt/outpost/current").readlink() == Path("1.2.3")
    assert (root / "etc/systemd/system/outpost.service").is_file()
    # it was unpacked into a temporary folder, gone afterwards
    unpacked = Path(re.search(r"copy the build (\S+) to ", r.stdout).group(1))
    assert unpacked.name == f"outpost-1.2.3-linux-{ARCH}"
    assert not unpacked.exists()


def test_dry_run_checks_the_release_and_changes_nothing(tmp_path):
    tarball = release(tmp_path / "dl")
    root = tmp_path / "root"
    root.mkdir()
    r = outpost("install", "--root", str(root), "--from", str(tarball), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "matches its .sha256" in r.stdout and "none done" in r.stdout
    assert f"{root}/opt/outpost/1.2.3" in r.stdout
    assert installed(root) == []


@pytest.mark.parametrize("damage", ["flipped byte", "appended byte", "truncated"])
def test_a_release_that_does_not_match_its_checksum_is_refused(tmp_path, damage):
    tarball = release(tmp_path / "dl")
    data = bytearray(tarball.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "appended byte":
        data += b"\0"
    else:
        data = data[:-100]
    tarball.write_bytes(bytes(data))
    root = tmp_path / "root"
    r = outpost("install", "--root", str(root), "--from", str(tarball))
    assert r.returncode != 0
    line = no_traceback(r)
    want = hashlib.sha256(bytes(data)).hexdigest()
    assert f"its SHA-256 is {want}, but {tarball.name}.sha256 says" in line
    assert "refused; nothing was installed" in line
    assert installed(root) == []


def test_a_release_without_its_checksum_is_refused(tmp_path):
    tarball = release(tmp_path / "dl")
    Path(f"{tarball}.sha256").unlink()
    root = tmp_path / "root"
    r = outpost("install", "--root", str(root), "--from", str(tarball))
    assert r.returncode != 0
    assert f"no {tarball.name}.sha256 beside it" in no_traceback(r)
    assert installed(root) == []


def test_a_checksum_file_for_another_file_is_refused(tmp_path):
    tarball = release(tmp_path / "dl")
    other = "0" * 64
    Path(f"{tarball}.sha256").write_text(f"{other}  outpost-9.9.9-linux-{ARCH}.tar.gz\n")
    r = outpost("install", "--root", str(tmp_path / "root"), "--from", str(tarball))
    assert r.returncode != 0
    assert f"has no SHA-256 line for {tarball.name}" in no_traceback(r)


@pytest.mark.skipif(ARCH not in ("x86_64", "aarch64"), reason="releases are x86_64, aarch64")
def test_a_release_for_another_architecture_is_refused(tmp_path):
    other = "aarch64" if ARCH == "x86_64" else "x86_64"
    tarball = release(tmp_path / "dl", arch=other)
    root = tmp_path / "root"
    r = outpost("install", "--root", str(root), "--from", str(tarball))
    assert r.returncode != 0
    assert f"a release for {other}; this machine is {ARCH}" in no_traceback(r)
    assert installed(root) == []


@pytest.mark.parametrize("member", [
    dict(name="../escaped.txt", data=b"x"),
    dict(name="/etc/escaped.txt", data=b"x"),
    dict(name="{top}/_internal/evil", kind=tarfile.SYMTYPE, link="../../../../etc/passwd"),
    dict(name="{top}/_internal/abs", kind=tarfile.SYMTYPE, link="/etc/passwd"),
    dict(name="{top}/dev", kind=tarfile.CHRTYPE),
])
def test_a_matching_release_with_a_member_outside_its_folder_is_refused(tmp_path, member):
    def extra(tar, top):
        _add(tar, member["name"].format(top=top), member.get("data", b""),
             kind=member.get("kind", tarfile.REGTYPE), link=member.get("link", ""))
    tarball = release(tmp_path / "dl", extra=extra)
    root = tmp_path / "root"
    r = outpost("install", "--root", str(root), "--from", str(tarball))
    assert r.returncode != 0
    assert "would land outside the release folder or is not a plain file" in no_traceback(r)
    assert installed(root) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_a_tarball_that_is_no_release_is_refused(tmp_path):
    tarball = tmp_path / f"outpost-1.2.3-linux-{ARCH}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        _add(tar, "a/outpost", b"#!/bin/sh\n", 0o755)
        _add(tar, "b/readme.txt", b"two folders")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    Path(f"{tarball}.sha256").write_text(f"{digest}  {tarball.name}\n")
    r = outpost("install", "--root", str(tmp_path / "root"), "--from", str(tarball))
    assert r.returncode != 0
    assert "not an outpost release" in no_traceback(r)
