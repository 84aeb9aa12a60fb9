"""pycuda: imported by name at run time (engines/tensorrt/cuda.py), so list its modules;
its CUDA headers are data that SourceModule compiles against."""

from PyInstaller.utils.hooks import collect_data_files, collect_submodules

hiddenimports = collect_submodules("pycuda", filter=lambda name: "autoinit" not in name)
datas = collect_data_files("pycuda")
