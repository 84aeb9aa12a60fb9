"""The TensorRT engine: build and cache a plan per device, load it as sessions.

A GPU is confirmed through the CUDA module before any TensorRT object exists: without a
usable GPU, ``trt.Runtime`` can hand back an object that crashes the process on first use.
Plans are cached under ``<data_dir>/engines/<key>.plan`` (key: DESIGN section 3, plus the
precision path: TensorRT's major version, weak or strong typing, and the graph converter
and its version) beside a sidecar naming what they were built for; a plan that does not
deserialize here is rebuilt, never served. The timing cache is kept per device in the same
folder, and so are graphs converted to fp16 for strongly typed builds. A plan built on
another device of the same key (engines/tensorrt/plan_key.py; a prebuilt plan the fleet
attached to a release) is ``adopt``ed into the cache once it deserializes here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import re
import tempfile
import threading
from pathlib import Path

from engines.base import Artifact, BuildOptions, Engine, RuntimeOptions, Session, file_sha256
from engines.cache import cache_key, get_or_build, put
from engines.errors import EngineUnavailable, LoadError
from engines.tensorrt.builder import BuildProgress, build_plan, has_qdq, make_logger
from engines.tensorrt.convert import converted_key, fp16_graph, load_converter
from engines.tensorrt.cuda import CudaApi, GpuInfo, load_cuda, usable_gpus
from engines.tensorrt.precision import PrecisionPath, check_model_fits, precision_path
from engines.tensorrt.runtime import TensorRTSession

log = logging.getLogger("outpost.engines")

INSTALL_HINT = "JetPack's python3-libnvinfer or pip's tensorrt provides it"


def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def load_tensorrt():
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or its native libraries failing to load
        raise EngineUnavailable(f"the tensorrt Python package is not usable ({exc}); "
                                f"{INSTALL_HINT}") from exc


def probe(*, trt=None, cuda: CudaApi | None = None) -> tuple[bool, str]:
    """Whether TensorRT can serve here, and a sentence saying why or why not."""
    if trt is None and not tensorrt_installed():
        return False, f"the tensorrt Python package is not installed ({INSTALL_HINT})"
    try:
        api = cuda or load_cuda()
        gpu = usable_gpus(api)[0]
    except EngineUnavailable as exc:
        return False, f"no usable NVIDIA GPU ({exc})"
    try:
        trt = trt or load_tensorrt()
    except EngineUnavailable as exc:
        return False, str(exc)
    return True, (f"TensorRT {trt.__version__} is installed and GPU 0 is {gpu.name} "
                  f"({gpu.sm}, {gpu.total_memory_bytes >> 20} MiB, via {api.name})")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


class TensorRTEngine(Engine):
    kind = "tensorrt"

    def __init__(self, *, trt=None, cuda: CudaApi | None = None, device_index: int = 0,
                 progress: BuildProgress | None = None, typing: str | None = None):
        self._trt = trt
        # None: weak or strong typing as the TensorRT version says; "weak" or "strong"
        # forces one where the version has both (build/gpu_check runs both on 10.x)
        self.typing = typing
        self._cuda = cuda
        self._gpu: GpuInfo | None = None
        self.device_index = device_index
        self.progress = progress
        self._runtime = None
        self._logger = None
        # Deserialized engines, shared by a version's instances; dropped (freeing the
        # weights on the device) when the last session made from one is closed.
        self._engines: dict[tuple[Path, str], object] = {}
        self._users: dict[tuple[Path, str], int] = {}
        self._lock = threading.Lock()

    # -- the device, checked before TensorRT -------------------------------------------

    def _ready(self):
        """(trt, cuda, gpu), having confirmed the GPU first."""
        with self._lock:
            if self._gpu is None:
                cuda = self._cuda or load_cuda()
                gpus = usable_gpus(cuda)
                if self.device_index >= len(gpus):
                    raise EngineUnavailable(f"GPU {self.device_index} asked for but the driver "
                                            f"reports {len(gpus)}")
                self._cuda, self._gpu = cuda, gpus[self.device_index]
            if self._trt is None:
                self._trt = load_tensorrt()
            return self._trt, self._cuda, self._gpu

    @property
    def gpu(self) -> GpuInfo:
        return self._ready()[2]

    def version(self) -> str:
        return str(self._ready()[0].__version__)

    def device_fields(self) -> dict:
        gpu = self.gpu
        return {"gpu": gpu.name, "compute_capability": list(gpu.compute_capability)}

    def precision_path(self, options: BuildOptions) -> PrecisionPath:
        """How this TensorRT builds ``options.precision``, the graph converter included;
        PrepareError when it can't here (an unknown precision, no converter installed)."""
        path = precision_path(self.version(), options.precision, self.typing)
        if path.convert_to:
            path = path.with_converter(load_converter(path.convert_to, path.trt_version).id)
        return path

    def key_for(self, source_sha256: str, options: BuildOptions,
                path: PrecisionPath | None = None) -> str:
        path = path or self.precision_path(options)
        return cache_key(source_sha256=source_sha256, kind=self.kind,
                         engine_version=self.version(), device=self.device_fields(),
                         build_fields={**options.cache_fields(),
                                       "precision_path": path.cache_fields()})

    def timing_cache_path(self, cache_dir: Path) -> Path:
        gpu = self.gpu
        return cache_dir / f"timing-{_slug(gpu.name)}-{gpu.sm}-trt{self.version()}.cache"

    # -- build ---------------------------------------------------------------------------

    def build(self, model_path: Path, options: BuildOptions, *,
              timing_cache: Path | None = None, progress: BuildProgress | None = None,
              cache_dir: Path | None = None) -> bytes:
        """A plan for this GPU, not cached (``outpost compile``); a graph converted for it
        is cached in ``cache_dir`` when one is given."""
        trt, cuda, gpu = self._ready()
        model_path = Path(model_path)
        path = self.precision_path(options)
        if path.precision != "fp32":
            check_model_fits(path, has_qdq(model_path), str(model_path))
        log.info("tensorrt build", extra={"model": str(model_path), "path": path.describe()})
        with contextlib.ExitStack() as stack:
            graph = model_path
            if path.convert_to:
                if cache_dir is None:  # nowhere to keep it: a folder for this build only
                    cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                converter = load_converter(path.convert_to, path.trt_version)
                graph = fp16_graph(converter, model_path, options, cache_dir)
            with cuda.activate(gpu.index):
                return build_plan(trt, graph, options, path, timing_cache=timing_cache,
                                  progress=progress or self.progress, shown=model_path)

    def plan_meta(self, source_sha: str, options: BuildOptions,
                  precision: PrecisionPath | None = None) -> dict:
        """What a plan of this model built here is for: the cache's sidecar, `outpost
        compile`'s, and (less the model) the plan key (engines/tensorrt/plan_key.py)."""
        precision = precision or self.precision_path(options)
        # The sidecar carries the TensorRT major version and typing mode: a plan of the
        # other generation found under this key is rebuilt, never served.
        meta = {"kind": self.kind, "engine_version": self.version(),
                "device": self.device_fields(), "source_sha256": source_sha,
                "build": options.cache_fields(), "precision_path": precision.cache_fields()}
        if precision.convert_to:
            meta["graph"] = converted_key(source_sha, precision.convert_to,
                                          precision.converter) + ".onnx"
        return meta

    def prepare(self, model_path: Path, options: BuildOptions, cache_dir: Path) -> Artifact:
        model_path, cache_dir = Path(model_path), Path(cache_dir)
        source_sha = file_sha256(model_path)
        precision = self.precision_path(options)
        key = self.key_for(source_sha, options, precision)
        meta = self.plan_meta(source_sha, options, precision)
        timing = self.timing_cache_path(cache_dir)
        path, _built = get_or_build(
            cache_dir, key, ".plan",
            lambda: self.build(model_path, options, timing_cache=timing, cache_dir=cache_dir),
            meta=meta, usable=lambda p: self._deserialize_complaint(p, options))
        return Artifact(self.kind, path, key, source_sha)

    def adopt(self, plan: Path, model_path: Path, options: BuildOptions, cache_dir: Path,
              origin: str) -> str | None:
        """Move ``plan``, built elsewhere for this device's key (its signature and hash
        already checked), into the cache where ``prepare`` would have built it; None once
        TensorRT deserialized it here, else why not (then nothing of it is cached).
        ``origin`` (where it came from) is kept in its sidecar."""
        source_sha = file_sha256(model_path)
        precision = self.precision_path(options)
        meta = {**self.plan_meta(source_sha, options, precision), "origin": origin}
        return put(Path(cache_dir), self.key_for(source_sha, options, precision), ".plan",
                   Path(plan), meta, lambda p: self._deserialize_complaint(p, options))

    # -- load ----------------------------------------------------------------------------

    def _deserialize(self, path: Path, options: BuildOptions):
        """(key, the ICudaEngine of ``path``) deserialized once; None when TensorRT refuses."""
        trt, cuda, gpu = self._ready()
        key = (path, file_sha256(path))
        with self._lock:
            cached = self._engines.get(key)
            if cached is not None:
                return key, cached
            with cuda.activate(gpu.index):
                if self._runtime is None:
                    self._logger = make_logger(trt)
                    self._runtime = trt.Runtime(self._logger)
                if options.version_compatible:
                    # Version-compatible plans embed a lean runtime; ours are built here.
                    self._runtime.engine_host_code_allowed = True
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                self._engines[key] = engine
            return key, engine

    def _deserialize_complaint(self, path: Path, options: BuildOptions) -> str | None:
        if self._deserialize(path, options)[1] is not None:
            return None
        said = " | ".join(self._logger.errors()[-2:]) if self._logger else ""
        return f"TensorRT {self.version()} could not deserialize it here" + (
            f": {said}" if said else "")

    def load(self, artifact: Artifact, options: BuildOptions, runtime: RuntimeOptions) -> Session:
        key, engine = self._deserialize(Path(artifact.path), options)
        if engine is None:
            raise LoadError(f"{artifact.path} is not a TensorRT {self.version()} plan for "
                            f"{self.gpu.name}; remove it and load again to rebuild it")
        with self._lock:
            self._users[key] = self._users.get(key, 0) + 1
        try:
            return TensorRTSession(self._trt, self._cuda, engine, self.gpu.index,
                                   options.max_batch_size, on_close=lambda: self._release(key))
        except BaseException:
            self._release(key)
            raise

    def _release(self, key: tuple[Path, str]) -> None:
        with self._lock:
            self._users[key] -= 1
            if self._users[key] <= 0:
                del self._users[key]
                self._engines.pop(key, None)
