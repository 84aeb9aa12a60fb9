"""Which engine serves on this host, and why."""

from __future__ import annotations

from engines.base import Engine
from engines.errors import EngineUnavailable

ENGINE_KINDS = ("auto", "onnxruntime", "tensorrt")


def select_engine(kind: str = "auto") -> tuple[Engine, str]:
    """The engine for ``kind`` and a sentence saying why it was chosen.

    ``auto`` takes TensorRT where its library and a GPU are usable, else ONNX Runtime.
    """
    if kind not in ENGINE_KINDS:
        raise EngineUnavailable(
            f"unknown engine {kind!r}; use one of {', '.join(ENGINE_KINDS)}"
        )
    if kind in ("auto", "tensorrt"):
        try:
            from engines.tensorrt import TensorRTEngine, probe  # noqa: PLC0415
        except ImportError:
            reason = "the TensorRT engine is not part of this build"
        else:
            ok, reason = probe()
            if ok:
                return TensorRTEngine(), reason
        if kind == "tensorrt":
            raise EngineUnavailable(f"engine 'tensorrt' was asked for but {reason}")
        from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: PLC0415

        return OnnxRuntimeEngine(), f"onnxruntime on the CPU, since {reason}"
    from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: PLC0415

    return OnnxRuntimeEngine(), "onnxruntime, as configured"
