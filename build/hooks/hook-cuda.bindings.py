"""cuda-python (cuda.bindings, 12.6+): Cython modules imported by name at run time
(engines/tensorrt/cuda.py), plus the path finder it uses to dlopen NVRTC and friends."""

from PyInstaller.utils.hooks import collect_dynamic_libs, collect_submodules

hiddenimports = collect_submodules("cuda.bindings") + collect_submodules("cuda.pathfinder")
binaries = collect_dynamic_libs("cuda.bindings")
