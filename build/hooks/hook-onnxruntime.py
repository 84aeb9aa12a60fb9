"""ONNX Runtime: its execution-provider plugins, and nothing it does not need.

The provider libraries (`libonnxruntime_providers_shared.so`, plus the CUDA and TensorRT
providers in the onnxruntime-gpu wheel) are loaded with dlopen, so PyInstaller's link
analysis does not see them. `libonnxruntime.so.<version>` is the C API library for C
programs; the Python module carries its own copy of the runtime, so that one (34 MB) stays
out. So do the offline tools (quantisation, transformers, training): outpost serves, it
does not convert.
"""

from PyInstaller.utils.hooks import collect_dynamic_libs

binaries = collect_dynamic_libs(
    "onnxruntime", search_patterns=["libonnxruntime_providers_*.so", "*.dll", "*.dylib"])
excludedimports = [
    "onnxruntime.quantization", "onnxruntime.transformers", "onnxruntime.tools",
    "onnxruntime.training",
]
