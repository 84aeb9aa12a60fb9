"""ONNX in, a runnable session out. Knows nothing of serving."""

from engines.base import (
    Artifact,
    BuildOptions,
    Engine,
    RuntimeOptions,
    Session,
    ShapeRange,
    TensorSpec,
)
from engines.errors import (
    EngineError,
    EngineUnavailable,
    LoadError,
    ModelInvalid,
    PrepareError,
    RunError,
)
from engines.select import ENGINE_KINDS, select_engine

__all__ = [
    "Artifact",
    "BuildOptions",
    "ENGINE_KINDS",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "LoadError",
    "ModelInvalid",
    "PrepareError",
    "RunError",
    "RuntimeOptions",
    "Session",
    "ShapeRange",
    "TensorSpec",
    "select_engine",
]
