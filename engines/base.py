"""The engine interface: ONNX in, a runnable session out.

An engine *prepares* an artifact for a device (ONNX Runtime: check and optimise;
TensorRT: build and cache a plan) and *loads* it as sessions. One session is one
model instance: the serving layer creates as many as it wants concurrent workers and
never calls one session from two threads at once. A session runs a batch of named
NumPy arrays and reports its tensor specs, with -1 for every dynamic dimension.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The one table of the dtypes outpost serves (DESIGN section 2): the NumPy name (the
# socket protocol's and the model config's), and the Open Inference Protocol's datatype
# (HTTP, gRPC). Engines map theirs onto these; the transports derive their tables from it.
DTYPE_TABLE = (
    ("float32", "FP32"), ("float16", "FP16"), ("float64", "FP64"), ("int8", "INT8"),
    ("uint8", "UINT8"), ("int16", "INT16"), ("int32", "INT32"), ("int64", "INT64"),
    ("bool", "BOOL"),
)
SUPPORTED_DTYPES = tuple(name for name, _ in DTYPE_TABLE)
V2_DATATYPES = dict(DTYPE_TABLE)  # NumPy name -> v2 datatype
NUMPY_DTYPES = {name: np.dtype(name) for name in SUPPORTED_DTYPES}  # native byte order


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, NumPy dtype name and shape (-1 = dynamic)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max of one input's full shape, batch dimension included."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildOptions:
    """What an engine needs to prepare one model for one device.

    The device fields come from the firmware profile; the model fields from the model's
    config. ``cache_fields`` is what the engine cache key hashes (DESIGN section 3).
    """

    # device (firmware profile)
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 (int8 only for Q/DQ models)
    workspace_bytes: int = 1 << 30
    optimization_level: int = 3
    dla_core: int = -1  # -1: no DLA
    gpu_fallback: bool = True
    version_compatible: bool = False
    # model
    max_batch_size: int = 0  # 0: the model has no batch dimension
    opt_batch_size: int = 1
    shape_ranges: dict[str, ShapeRange] = field(default_factory=dict)

    def cache_fields(self) -> dict:
        return {
            "precision": self.precision,
            "workspace_bytes": self.workspace_bytes,
            "optimization_level": self.optimization_level,
            "dla_core": self.dla_core,
            "gpu_fallback": self.gpu_fallback,
            "version_compatible": self.version_compatible,
            "max_batch_size": self.max_batch_size,
            "opt_batch_size": self.opt_batch_size,
            "shape_ranges": {
                k: [list(v.min), list(v.opt), list(v.max)]
                for k, v in sorted(self.shape_ranges.items())
            },
        }


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run sessions: threads for CPU engines, the device for GPU engines."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # ONNX Runtime: idle intra-op threads spin for the next batch instead of sleeping, for
    # some 50 ms after a batch (quicker to start the next one; CPU spent while requests come)
    spinning: bool = False
    device_id: int = 0


@dataclass(frozen=True)
class Artifact:
    """What ``prepare`` produced: a file the engine can load, and how it was made."""

    kind: str
    path: Path
    cache_key: str
    source_sha256: str


class Session(abc.ABC):
    """One loaded model instance. Not thread-safe: one caller at a time."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int  # 0: no batch dimension
    # True when run() may be called from any thread (the serving loop runs very quick
    # models inline). GPU sessions bound to a thread's CUDA context leave it False.
    inline_ok: bool = False

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""

    def warmup(self) -> None:
        """Run once on zeros shaped like a batch of one (a quick check that it runs);
        ``warm_to_steady`` is what the server calls before it reports ready."""
        self.run(self.zeros(1))

    def zeros(self, batch_size: int) -> dict[str, np.ndarray]:
        """Inputs of zeros: ``batch_size`` rows where the model has a batch dimension,
        1 for every other dynamic dim."""
        feeds = {}
        for spec in self.inputs:
            shape = [1 if d < 0 else d for d in spec.shape]
            if self.max_batch_size and shape:
                shape[0] = batch_size
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds

    def warm_to_steady(self, batch_sizes: tuple[int, ...], budget_s: float) -> list:
        """Run each batch size until two consecutive runs agree (engines/warmup.py);
        returns a ``WarmStep`` per size."""
        from engines.warmup import warm_to_steady  # noqa: PLC0415

        sizes = batch_sizes if self.max_batch_size else (1,)
        return warm_to_steady(lambda n: self.run(self.zeros(n)), sizes, budget_s=budget_s)

    def device_memory_bytes(self) -> int:
        """Accelerator memory this instance holds that the process's RSS does not show
        (a GPU engine's context and buffers); 0 for a CPU engine."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the session holds; the default has nothing to free."""


class Engine(abc.ABC):
    kind: str

    @abc.abstractmethod
    def version(self) -> str:
        """The engine library's version; part of the cache key."""

    @abc.abstractmethod
    def prepare(self, model_path: Path, options: BuildOptions, cache_dir: Path) -> Artifact:
        """Make (or find in ``cache_dir``) what ``load`` needs for this device."""

    @abc.abstractmethod
    def load(self, artifact: Artifact, options: BuildOptions, runtime: RuntimeOptions) -> Session:
        """One new session (model instance) from a prepared artifact."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
