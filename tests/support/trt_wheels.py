"""The real TensorRT Python bindings of each API generation, read from their PyPI wheels
without loading them: a test can hold the stand-in and the engine against their names.

The bindings wheels (``tensorrt-cu11-bindings`` 10.13.0.35, ``tensorrt-cu13-bindings``
11.4.0.106; about 1.2 MB each) hold ``tensorrt_bindings/tensorrt.so``, a pybind11 module, and
``__init__.py``; they ship no .pyi stubs, and the native libraries they link against come in
other wheels (placeholders on PyPI), so the module can't be imported here. Its names can
still be read: pybind11 keeps every class, method, property and enum member name as a
NUL-terminated string in the module, and its docstrings beside them. The linker shares a
string's tail with a longer one ('INT8' lives inside 'UINT8'), so a name that is missing is
surely missing, while one that is found may be the tail of another: the enum members that
matter (the precision flags) are also checked by their docstrings.

The wheels are downloaded once per machine with pip into ``$OUTPOST_TEST_CACHE`` (default
``~/.cache/outpost-test``)/trt-wheels, bounded by timeouts; offline, the tests that need
them skip and say so.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEELS = {10: ("tensorrt-cu11-bindings", "10.13.0.35"),
          11: ("tensorrt-cu13-bindings", "11.4.0.106")}
CACHE_ENV = "OUTPOST_TEST_CACHE"
DOWNLOAD_TIMEOUT_S = 120
# The wheels are platform wheels; their names do not depend on the platform, so one
# platform's wheel serves every host.
PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
            "--implementation", "cp", "--only-binary=:all:")


class Unavailable(Exception):
    """The wheel is not cached and could not be downloaded; the message says why."""


@dataclass(frozen=True)
class Bindings:
    """One generation's bindings, as names and docstrings (nothing is loaded)."""

    package: str
    version: str
    module: bytes  # tensorrt.so
    init_names: frozenset[str]  # what __init__.py defines at module level (nptype, ...)

    def has(self, name: str) -> bool:
        """Whether the bindings name ``name`` (a class, attribute or enum member)."""
        return name in self.init_names or (name.encode() + b"\0") in self.module

    def says(self, text: str) -> bool:
        """Whether a docstring of the bindings contains ``text``."""
        return text.encode() in self.module


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "outpost-test"
    return Path(root) / "trt-wheels"


def wheel_path(generation: int) -> Path:
    """The cached wheel of ``generation``, downloaded first when missing (Unavailable)."""
    package, version = WHEELS[generation]
    folder = cache_dir()
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(folder.glob(f"{stem}*.whl")) if folder.is_dir() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "--timeout", "20", "--retries", "1", *PLATFORM, "-d", str(folder),
           f"{package}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"pip download {package}=={version} took over "
                          f"{DOWNLOAD_TIMEOUT_S} s") from exc
    found = sorted(folder.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"pip download {package}=={version} failed: {said}")
    return found[0]


def load(generation: int) -> Bindings:
    package, version = WHEELS[generation]
    path = wheel_path(generation)
    with zipfile.ZipFile(path) as whl:
        module = whl.read("tensorrt_bindings/tensorrt.so")
        init = whl.read("tensorrt_bindings/__init__.py").decode()
    names = set()
    for node in ast.parse(init).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return Bindings(package, version, module, frozenset(names))
