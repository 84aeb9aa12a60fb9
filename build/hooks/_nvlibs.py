"""Which NVIDIA libraries a frozen build must carry by hand, and under which names.

TensorRT's Python module links libnvinfer and friends (PyInstaller follows those links),
but TensorRT loads some of its own parts with dlopen at run time: the builder resource
(`libnvinfer_builder_resource.so.<full version>`), the lean and dispatch runtimes, the
plugin and ONNX parser libraries. Those must be collected explicitly, each under the name
the loader will ask for, and each real file once: a library's SONAME (`libX.so.10`), or
its own file name where it has no SONAME-style alias. The unversioned `libX.so` is a
link-time name only and is never shipped.

Pure functions over a folder listing, so the choice can be tested without TensorRT.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

TENSORRT_PATTERNS = ("libnvinfer*.so*", "libnvonnxparser*.so*")
# A name the dynamic loader asks for: lib<name>.so.<major>
_SONAME = re.compile(r"lib[\w+.-]+?\.so\.\d+")
# dlopened by their full file name (TensorRT 8.6+ builder resources)
_FULL_NAME = re.compile(r"libnvinfer_builder_resource[\w.]*\.so[\d.]*")


def loader_names(folder: Path, patterns: tuple[str, ...] = TENSORRT_PATTERNS) -> list[Path]:
    """For each real library in ``folder`` matching ``patterns``: the path to ship it as."""
    groups: dict[Path, list[Path]] = {}
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            if path.is_file():  # follows links; skips dangling ones and folders
                names = groups.setdefault(path.resolve(), [])
                if path not in names:
                    names.append(path)
    chosen = []
    for real, names in sorted(groups.items()):
        if _FULL_NAME.fullmatch(real.name):
            chosen.append(real)
            continue
        sonames = sorted(n for n in names if _SONAME.fullmatch(n.name))
        if sonames:
            chosen.append(sonames[0])
        elif any(n.name != real.name for n in names) or not real.name.endswith(".so"):
            chosen.append(real)
        # else: a lone unversioned libX.so: nothing links against that name at run time
    return chosen


def ldconfig_dirs(stem: str) -> list[Path]:
    """Folders where the system's loader cache knows ``stem`` (e.g. libnvinfer.so)."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                             check=False, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_ldconfig(out, stem)


def parse_ldconfig(text: str, stem: str) -> list[Path]:
    dirs: list[Path] = []
    for line in text.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.split(" ", 1)[0].startswith(stem) and target:
            folder = Path(target).parent
            if folder not in dirs:
                dirs.append(folder)
    return dirs
