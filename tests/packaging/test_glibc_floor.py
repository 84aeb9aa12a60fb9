"""build/glibc_floor.py: the symbol versions an ELF file needs, read from its own section
headers, held to a floor; checked against binutils' readelf on this machine's own
libraries, and run as the command a release build runs."""

from __future__ import annotations

import ctypes.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "build"))

import glibc_floor  # noqa: E402


def _system_lib(name: str) -> Path:
    found = ctypes.util.find_library(name)
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64",
                   "/usr/lib64", "/usr/lib"):
        if found and (Path(folder) / found).exists():
            return (Path(folder) / found).resolve()
    pytest.skip(f"no {name} library found here to read")


def _newest_glibc(versions) -> tuple[int, ...]:
    return max(glibc_floor.version_tuple(v.partition("_")[2])
               for v in versions if v.startswith("GLIBC_2"))


def test_needed_versions_agree_with_readelf():
    lib = _system_lib("stdc++")
    needs, defines = glibc_floor.symbol_versions(lib)
    assert any(v.startswith("GLIBCXX_3.4") for v in defines)  # libstdc++ defines its own
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("binutils' readelf is not installed to compare with")
    text = subprocess.run([readelf, "-V", "--wide", str(lib)], capture_output=True,
                          text=True, check=True).stdout
    needed_part = text.split("Version needs section")[1]
    theirs = set(re.findall(r"Name: (GLIBC_[0-9.]+)", needed_part))
    assert {v for _, v in needs if v.startswith("GLIBC_")} == theirs
    assert _newest_glibc(theirs) == _newest_glibc(v for _, v in needs)


def test_a_bundle_above_the_floor_fails_naming_the_file_and_version(tmp_path, capsys):
    lib = _system_lib("stdc++")
    bundle = tmp_path / "outpost" / "_internal"
    bundle.mkdir(parents=True)
    shutil.copy(lib, bundle / "libstdc++.so.6")
    (bundle / "notes.txt").write_text("not an ELF file")
    newest = ".".join(map(str, _newest_glibc(v for _, v in glibc_floor.symbol_versions(lib)[0])))
    below = "2.0"
    assert glibc_floor.main([str(tmp_path / "outpost"), "--glibc", below]) == 1
    out = capsys.readouterr().out
    assert f"_internal/libstdc++.so.6: needs GLIBC_{newest} (from lib" in out
    # Its own GLIBCXX versions are met by itself, whatever the GLIBCXX floor
    assert "GLIBCXX" not in out
    assert glibc_floor.main([str(tmp_path / "outpost"), "--glibc", newest]) == 0
    assert "runs on glibc" in capsys.readouterr().out


def test_a_missing_folder_is_one_clear_line(tmp_path, capsys):
    assert glibc_floor.main([str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
