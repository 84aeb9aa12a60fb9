"""The TensorRT engine (TensorRT 10 and 11 Python APIs; CUDA through ``engines.tensorrt.cuda``).

Importing this package needs neither TensorRT nor CUDA: ``probe()`` says whether both are
usable here, and ``engines.select`` falls back to ONNX Runtime with that reason.
"""

from engines.tensorrt.engine import TensorRTEngine, load_tensorrt, probe

__all__ = ["TensorRTEngine", "load_tensorrt", "probe"]
