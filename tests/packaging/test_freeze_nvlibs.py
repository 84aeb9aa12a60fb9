"""build/hooks/_nvlibs.py: which TensorRT libraries a frozen build carries, and under which
names, for the two layouts TensorRT comes in (JetPack's versioned files with symlinks; the
pip wheels' plain files). Real files and symlinks in a temporary folder; no TensorRT needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "build" / "hooks"))

from _nvlibs import loader_names, parse_ldconfig  # noqa: E402


def lib(folder: Path, name: str, size: int = 16) -> Path:
    path = folder / name
    path.write_bytes(b"\x7fELF" + b"\0" * size)
    return path


def link(folder: Path, name: str, target: str) -> None:
    os.symlink(target, folder / name)


def test_jetpack_layout_ships_each_library_once_by_its_soname(tmp_path):
    # /usr/lib/aarch64-linux-gnu on JetPack 6: real files, .so.10 and .so links
    for stem in ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser", "libnvinfer_lean",
                 "libnvinfer_dispatch"):
        lib(tmp_path, f"{stem}.so.10.3.0")
        link(tmp_path, f"{stem}.so.10", f"{stem}.so.10.3.0")
        link(tmp_path, f"{stem}.so", f"{stem}.so.10")
    lib(tmp_path, "libnvinfer_builder_resource.so.10.3.0")
    lib(tmp_path, "libnvcudla.so")  # not TensorRT: not matched
    link(tmp_path, "libnvinfer_vc_plugin.so.10", "gone.so.10")  # dangling: skipped

    names = [p.name for p in loader_names(tmp_path)]
    assert sorted(names) == [
        "libnvinfer.so.10", "libnvinfer_builder_resource.so.10.3.0",
        "libnvinfer_dispatch.so.10", "libnvinfer_lean.so.10", "libnvinfer_plugin.so.10",
        "libnvonnxparser.so.10",
    ]


def test_wheel_layout_ships_the_plain_files(tmp_path):
    # tensorrt_libs from the pip wheels: plain files named by SONAME, no links
    for name in ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10",
                 "libnvinfer_builder_resource.so.10.8.0"):
        lib(tmp_path, name)
    assert sorted(p.name for p in loader_names(tmp_path)) == [
        "libnvinfer.so.10", "libnvinfer_builder_resource.so.10.8.0",
        "libnvinfer_plugin.so.10", "libnvonnxparser.so.10"]


def test_a_builder_resource_link_does_not_hide_the_name_tensorrt_dlopens(tmp_path):
    lib(tmp_path, "libnvinfer_builder_resource.so.10.3.0")
    link(tmp_path, "libnvinfer_builder_resource.so.10", "libnvinfer_builder_resource.so.10.3.0")
    assert [p.name for p in loader_names(tmp_path)] == ["libnvinfer_builder_resource.so.10.3.0"]


def test_a_lone_unversioned_library_is_not_shipped(tmp_path):
    lib(tmp_path, "libnvinfer.so")  # a link-time name only
    assert loader_names(tmp_path) == []
    assert loader_names(tmp_path / "missing") == []


def test_ldconfig_output_gives_the_library_folders():
    text = """\
1234 libs found in cache `/etc/ld.so.cache'
	libnvinfer_plugin.so.10 (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libnvinfer_plugin.so.10
	libnvinfer.so.10 (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libnvinfer.so.10
	libnvinfer.so (libc6,AArch64) => /usr/lib/aarch64-linux-gnu/libnvinfer.so
	libnvinfer.so.8 (libc6,AArch64) => /opt/trt8/lib/libnvinfer.so.8
	libm.so.6 (libc6,AArch64) => /lib/aarch64-linux-gnu/libm.so.6
"""
    assert parse_ldconfig(text, "libnvinfer.so") == [
        Path("/usr/lib/aarch64-linux-gnu"), Path("/opt/trt8/lib")]
    assert parse_ldconfig("", "libnvinfer.so") == []
