"""ONNX Runtime engine (CPU): the engine wherever TensorRT or a GPU is absent.

``prepare`` checks the model loads and saves a graph-optimised copy in the engine cache,
so later starts skip that optimisation; ``load`` makes one InferenceSession per instance.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from engines.base import (
    Artifact,
    BuildOptions,
    Engine,
    RuntimeOptions,
    Session,
    TensorSpec,
    file_sha256,
)
from engines.cache import cache_key
from engines.errors import EngineUnavailable, LoadError, PrepareError, RunError
from engines.files import replace_synced

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EngineUnavailable(
            "onnxruntime is not installed: install the outpost-appliance package's dependencies"
        ) from exc
    return onnxruntime


def _spec(arg, where: str) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise LoadError(
            f"{where} '{arg.name}' has type {arg.type}, which outpost cannot carry; "
            f"use one of {', '.join(sorted(_ORT_TYPES))}"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, dtype, shape)


class OnnxRuntimeSession(Session):
    inline_ok = True  # an InferenceSession may be run from any thread

    def __init__(self, sess, max_batch_size: int):
        self._sess = sess
        # The binding's own run, past the Python wrapper's per-call checks (input names,
        # graph capture, OrtValue ownership): ``run`` gets inputs already checked against
        # the model. Measured 4.5-6.5 us against 6.0-9.7 us per call on the identity model.
        binding = getattr(sess, "_sess", None)
        self._binding_run = getattr(binding, "run", None)
        self.inputs = tuple(_spec(a, "input") for a in sess.get_inputs())
        self.outputs = tuple(_spec(a, "output") for a in sess.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self.max_batch_size = max_batch_size

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if self._binding_run is not None:
                results = self._binding_run(self._output_names, feeds, None)
            else:
                results = self._sess.run(self._output_names, feeds)
        except Exception as exc:  # ORT raises its own untyped errors
            raise RunError(f"onnxruntime failed to run the batch: {exc}") from exc
        return dict(zip(self._output_names, results))


class OnnxRuntimeEngine(Engine):
    kind = "onnxruntime"

    def version(self) -> str:
        return _ort().__version__

    def _device(self) -> dict:
        return {"cpu": platform.machine(), "providers": ["CPUExecutionProvider"]}

    def prepare(self, model_path: Path, options: BuildOptions, cache_dir: Path) -> Artifact:
        ort = _ort()
        source_sha = file_sha256(model_path)
        key = cache_key(
            source_sha256=source_sha,
            kind=self.kind,
            engine_version=self.version(),
            device=self._device(),
            build_fields={},  # ORT's optimised graph depends on none of the build fields
        )
        cache_dir.mkdir(parents=True, exist_ok=True)
        target = cache_dir / f"{key}.onnx"
        if target.exists():
            return Artifact(self.kind, target, key, source_sha)
        tmp = cache_dir / f".{key}.{os.getpid()}.onnx.tmp"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise PrepareError(
                f"onnxruntime could not load {model_path}: {exc}; check the model's opset "
                f"and operators against onnxruntime {self.version()}"
            ) from exc
        if not tmp.exists() or tmp.stat().st_size == 0:
            # Models with external data are served from their own directory.
            tmp.unlink(missing_ok=True)
            return Artifact(self.kind, model_path, key, source_sha)
        replace_synced(tmp, target)
        return Artifact(self.kind, target, key, source_sha)

    def load(self, artifact: Artifact, options: BuildOptions, runtime: RuntimeOptions) -> Session:
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = runtime.intra_op_threads
        so.inter_op_num_threads = runtime.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Spinning, the threads wait for work in a busy loop, during a batch and for a while
        # after it (ONNX Runtime's own spin count, about 50 ms of a core on the benchmark
        # machine) before they sleep: the next batch of a steady stream finds them awake.
        # Stopped after each batch instead (``session.force_spinning_stop``), they slept
        # between a sequential client's requests and each batch paid their wake-up: the
        # demo CNN at c=1 took 0.3-0.6 ms longer a request over the socket. Whether
        # spinning pays is measured per model (appliance/scheduling/tuning.py).
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "1" if runtime.spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            sess = ort.InferenceSession(str(artifact.path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise LoadError(f"onnxruntime could not load {artifact.path}: {exc}") from exc
        return OnnxRuntimeSession(sess, options.max_batch_size)
