"""TensorRT, where this build host can import it (a JetPack board, or a GPU box with the
TensorRT wheels).

The wheels' libraries live in `tensorrt_libs` (pyinstaller-hooks-contrib collects those);
JetPack's live in the system library folder (/usr/lib/aarch64-linux-gnu). Either way the
parts TensorRT dlopens (builder resource, lean/dispatch runtimes, plugins, ONNX parser)
are collected here by the names the loader asks for. libcuda and the L4T driver libraries
are never bundled: they belong to the device (build/outpost.spec filters them).
"""

import os
import sys
from pathlib import Path

from PyInstaller.utils.hooks import collect_dynamic_libs, collect_submodules, get_package_paths

sys.path.insert(0, os.path.dirname(__file__))
from _nvlibs import ldconfig_dirs, loader_names  # noqa: E402

hiddenimports = collect_submodules("tensorrt")
binaries = collect_dynamic_libs("tensorrt", search_patterns=["lib*.so", "lib*.so.*", "*.so"])

folders: list[Path] = []
_, pkg_dir = get_package_paths("tensorrt")
folders.append(Path(pkg_dir))
try:
    _, libs_dir = get_package_paths("tensorrt_libs")
    folders.append(Path(libs_dir))
    hiddenimports.append("tensorrt_libs")
except Exception:  # noqa: BLE001 - JetPack has no tensorrt_libs package
    pass
if os.environ.get("TENSORRT_LIB_DIR"):
    folders.append(Path(os.environ["TENSORRT_LIB_DIR"]))
folders += ldconfig_dirs("libnvinfer.so")

_seen = {Path(dest, Path(src).name) for src, dest in binaries}
for folder in folders:
    for lib in loader_names(folder):
        if Path(".", lib.name) not in _seen:
            binaries.append((str(lib), "."))
            _seen.add(Path(".", lib.name))
