"""Stand-ins for TensorRT and CUDA on hosts with neither, faithful where it matters.

``StandinCuda`` implements ``engines.tensorrt.cuda.CudaApi`` over host memory: "device"
buffers are real allocations with real addresses, copies and kernels are queued on their
stream and only happen at ``synchronize`` (as on a GPU), async copies refuse pageable
memory, and a device must be active on the thread for any work.

``make_trt(cuda, generation=10 | 11)`` returns a module-like object following the
TensorRT Python API of that generation, as far as the engine uses it (Builder,
INetworkDefinition, OnnxParser, IBuilderConfig, IOptimizationProfile, ITimingCache,
IProgressMonitor, Runtime, ICudaEngine, IExecutionContext):

- 10.x (default version 10.3.0, JetPack 6's): BuilderFlag.FP16/BF16/INT8 and
  NetworkDefinitionCreationFlag.EXPLICIT_BATCH exist; a network is strongly typed only with
  the STRONGLY_TYPED creation flag;
- 11.x (default 11.4.0): none of those four exist and every network is strongly typed.

Either way a strongly typed network refuses the precision flags at build time, and a plan
built by another TensorRT version does not deserialize (unless version-compatible and
from the same major version). tests/engines/test_tensorrt_api_surface.py holds these
surfaces against the real 10.13 and 11.4 bindings and the real 11.4 lean runtime.

Its "plans" carry the ONNX graph that was parsed (the converted one, for fp16 on a strongly
typed build) and the build settings; its execution contexts read inputs from the bound
device addresses, run that graph with ONNX Runtime, and write outputs to the bound
addresses, so buffer handling is tested for real: a wrong size, a missing
``set_input_shape``, a copy read before ``synchronize`` gives wrong numbers or an error, as
it would on a GPU. Everything the engine did is recorded for tests to inspect (``events``;
``builds``, the settings of each build; ``deserialized``, the sha256 of each blob handed to
``deserialize_cuda_engine``), and inside
``record_engine_use()`` so is every TensorRT name that code in ``engines`` looked up.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import enum
import hashlib
import json
import math
import sys
import threading
import types
from pathlib import Path

import numpy as np

from engines.errors import EngineUnavailable, RunError
from engines.tensorrt.cuda import CudaApi, DeviceBuffer, GpuInfo, PinnedBuffer, Stream


class StandinCuda(CudaApi):
    name = "standin"

    def __init__(self, gpus: list[GpuInfo] | None = None):
        self.gpus = [GpuInfo(0, "Standin Orin", (8, 7), 8 << 30)] if gpus is None else gpus
        self.device_allocs: dict[int, np.ndarray] = {}
        self.pinned_allocs: dict[int, np.ndarray] = {}
        self.alloc_sizes: list[int] = []
        self.streams: dict[int, StandinStream] = {}
        self._local = threading.local()
        self._next_stream = 1

    # devices
    def device_count(self) -> int:
        if not self.gpus:
            raise EngineUnavailable("cudaGetDeviceCount failed: cudaErrorNoDevice: no "
                                    "CUDA-capable device is detected")
        return len(self.gpus)

    def device(self, index: int) -> GpuInfo:
        return self.gpus[index]

    @contextlib.contextmanager
    def activate(self, index: int):
        prev = getattr(self._local, "device", None)
        self._local.device = index
        try:
            yield
        finally:
            self._local.device = prev

    def require_active(self, what: str) -> None:
        if getattr(self._local, "device", None) is None:
            raise RuntimeError(f"standin: {what} with no CUDA device current on this thread "
                               f"(on a real host TensorRT would use the wrong context)")

    # memory
    def alloc(self, nbytes: int) -> DeviceBuffer:
        self.require_active("cudaMalloc")
        arr = np.full(max(1, nbytes), 0xCD, np.uint8)  # garbage, like fresh device memory
        ptr = arr.ctypes.data
        self.device_allocs[ptr] = arr
        self.alloc_sizes.append(nbytes)
        return DeviceBuffer(ptr, nbytes, lambda: self.device_allocs.pop(ptr))

    def pinned(self, nbytes: int) -> PinnedBuffer:
        arr = np.zeros(max(1, nbytes), np.uint8)
        ptr = arr.ctypes.data
        self.pinned_allocs[ptr] = arr
        return PinnedBuffer(arr[:nbytes], lambda: self.pinned_allocs.pop(ptr))

    def check_device_range(self, ptr: int, nbytes: int, what: str) -> None:
        for base, arr in self.device_allocs.items():
            if base <= ptr and ptr + nbytes <= base + arr.nbytes:
                return
        raise RuntimeError(f"standin: {what} touches {nbytes} bytes at {ptr:#x}, outside "
                           f"every live device allocation")

    def _check_pinned(self, buf: PinnedBuffer, nbytes: int) -> None:
        ptr = buf.array.ctypes.data
        if not any(b <= ptr and ptr + nbytes <= b + a.nbytes
                   for b, a in self.pinned_allocs.items()):
            raise RuntimeError("standin: async copy with pageable host memory")

    # streams
    def stream(self) -> Stream:
        self.require_active("cudaStreamCreate")
        handle = self._next_stream
        self._next_stream += 1
        s = self.streams[handle] = StandinStream()
        return Stream(handle, s.synchronize, lambda: self.streams.pop(handle))

    def enqueue(self, handle: int, op) -> None:
        self.streams[handle].ops.append(op)

    def copy_to_device(self, dst, src, nbytes, stream) -> None:
        self.require_active("cudaMemcpyAsync")
        if nbytes > dst.nbytes or nbytes > src.nbytes:
            raise RunError("copy does not fit")
        self._check_pinned(src, nbytes)
        self.check_device_range(dst.ptr, nbytes, "H2D copy")
        src_ptr = src.array.ctypes.data
        self.enqueue(stream.handle, lambda: ctypes.memmove(dst.ptr, src_ptr, nbytes))

    def copy_to_host(self, dst, src, nbytes, stream) -> None:
        self.require_active("cudaMemcpyAsync")
        if nbytes > dst.nbytes or nbytes > src.nbytes:
            raise RunError("copy does not fit")
        self._check_pinned(dst, nbytes)
        self.check_device_range(src.ptr, nbytes, "D2H copy")
        dst_ptr = dst.array.ctypes.data
        self.enqueue(stream.handle, lambda: ctypes.memmove(dst_ptr, src.ptr, nbytes))


class StandinStream:
    def __init__(self):
        self.ops: list = []

    def synchronize(self) -> None:
        ops, self.ops = self.ops, []
        for op in ops:
            op()


# -- TensorRT ------------------------------------------------------------------------------

PLAN_MAGIC = b"STANDIN-TRT-PLAN\n"
VERSIONS = {10: "10.3.0", 11: "11.4.0"}  # each generation's default version
# The module's attributes that are the stand-in's own, for tests: not TensorRT's API.
TEST_HOOKS = frozenset({"events", "builds", "deserialized", "fail_build", "fail_execute",
                        "generation"})
_PRECISION_FLAGS = frozenset({"FP16", "BF16", "INT8"})

# -- which TensorRT names the engine looks up ----------------------------------------------

_recording: set | None = None


@contextlib.contextmanager
def record_engine_use():
    """Collect ``(owner, name)`` for every stand-in TensorRT attribute that code in
    ``engines`` looked up (and found) while the block runs; owner ``tensorrt`` is the
    module, else the class's TensorRT name (``BuilderFlag``, ``IExecutionContext``...)."""
    global _recording
    previous, _recording = _recording, set()
    try:
        yield _recording
    finally:
        _recording = previous


def _note(owner: str, name: str) -> None:
    if _recording is None or name.startswith("_"):
        return
    if sys._getframe(2).f_globals.get("__name__", "").startswith("engines."):
        _recording.add((owner, name))


class _Recorded:
    """Instances whose attribute look-ups from ``engines`` are recorded."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        _note(object.__getattribute__(self, "_trt_name"), name)
        return value


class _RecordedType(type):
    """Classes whose class-level look-ups (``ILogger.Severity``) are recorded."""

    def __getattribute__(cls, name):
        value = type.__getattribute__(cls, name)
        _note(type.__getattribute__(cls, "_trt_name"), name)
        return value


class _RecordedEnumType(enum.EnumMeta):
    def __getattribute__(cls, name):
        value = super().__getattribute__(name)
        _note(type.__getattribute__(cls, "__name__"), name)
        return value


class _RecordedIntEnum(enum.IntEnum, metaclass=_RecordedEnumType):
    pass


def _enum(name: str, members: dict[str, int]):
    return _RecordedIntEnum(name, members)


# -- the enums of both generations (values as the real bindings number them) ---------------

Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3,
                              "VERBOSE": 4})
DataType = _enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4,
                              "UINT8": 5, "BF16": 7, "INT64": 8})
TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
DeviceType = _enum("DeviceType", {"GPU": 0, "DLA": 1})
BUILDER_FLAGS = {
    10: {"FP16": 0, "INT8": 1, "GPU_FALLBACK": 3, "VERSION_COMPATIBLE": 13, "BF16": 17},
    11: {"GPU_FALLBACK": 3, "VERSION_COMPATIBLE": 12},  # 11.0 removed the precision flags
}
NETWORK_FLAGS = {
    10: {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    11: {"STRONGLY_TYPED": 1},  # kept, but ignored: every 11.x network is strongly typed
}


class ILogger(metaclass=_RecordedType):
    _trt_name = "ILogger"
    Severity = Severity

    def __init__(self):
        pass

    def log(self, severity, msg):  # pragma: no cover - overridden
        pass


class IProgressMonitor(metaclass=_RecordedType):
    _trt_name = "IProgressMonitor"

    def __init__(self):
        pass


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
       DataType.INT64: np.int64}
_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32,
                9: DataType.BOOL, 2: DataType.UINT8, 7: DataType.INT64, 16: DataType.BF16}
_ONNX_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


def nptype(dt):
    if dt not in _NP:
        raise TypeError(f"Could not resolve TensorRT datatype {dt} to an equivalent numpy type")
    return _NP[dt]


class ITensor(_Recorded):
    _trt_name = "ITensor"

    def __init__(self, name, shape, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class INetworkDefinition(_Recorded):
    _trt_name = "INetworkDefinition"

    def __init__(self, flags, strongly_typed: bool):
        self._flags = flags
        self._strongly_typed = strongly_typed
        self._inputs: list[ITensor] = []
        self._outputs: list[ITensor] = []
        self._onnx: bytes = b""
        self._float_types: list[str] = []

    @property
    def num_inputs(self):
        return len(self._inputs)

    def get_input(self, i):
        return self._inputs[i]

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, i):
        return self._outputs[i]


class ParserError(_Recorded):
    _trt_name = "ParserError"

    def __init__(self, desc, node, node_name, op):
        self._desc, self._node, self._name, self._op = desc, node, node_name, op

    def desc(self):
        return self._desc

    def node(self):
        return self._node

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op

    def code(self):
        return 8  # UNSUPPORTED_NODE


class IOptimizationProfile(_Recorded):
    _trt_name = "IOptimizationProfile"

    def __init__(self):
        self._shapes: dict[str, tuple] = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's own names
        self._shapes[name] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, name):
        return [list(s) for s in self._shapes[name]]


class ITimingCache(_Recorded):
    _trt_name = "ITimingCache"

    def __init__(self, device: str, entries: int):
        self._device, self._entries = device, entries

    def serialize(self):
        return json.dumps({"device": self._device, "entries": self._entries}).encode()


class IHostMemory(bytes):
    pass


class TRT(types.SimpleNamespace):
    """The module object; ``events``, ``builds`` record what the engine asked for."""

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        _note("tensorrt", name)
        return value


def _graph_float_types(model) -> list[str]:
    """The float types of the graph's constants: what the network computes in."""
    types_ = {_ONNX_NAMES.get(t.data_type, str(t.data_type)) for t in model.graph.initializer
              if t.data_type in _ONNX_NAMES}
    types_ |= {"float16" for n in model.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == 10 for a in n.attribute)}
    return sorted(types_)


def make_trt(cuda: StandinCuda, *, generation: int = 10, version: str | None = None,
             unsupported_ops=("NonZeroX",), dla_cores: int = 0, fail_build: str = "",
             fail_execute: bool = False):
    if generation not in VERSIONS:
        raise ValueError(f"generation {generation}: the stand-in has {sorted(VERSIONS)}")
    version = version or VERSIONS[generation]
    if not version.startswith(f"{generation}."):
        raise ValueError(f"version {version} is not of generation {generation}")
    builder_flag = _enum("BuilderFlag", BUILDER_FLAGS[generation])
    network_flag = _enum("NetworkDefinitionCreationFlag", NETWORK_FLAGS[generation])
    trt = TRT(__version__=version, ILogger=ILogger, Logger=ILogger, IProgressMonitor=
              IProgressMonitor, DataType=DataType, TensorIOMode=TensorIOMode,
              MemoryPoolType=MemoryPoolType, BuilderFlag=builder_flag, DeviceType=DeviceType,
              NetworkDefinitionCreationFlag=network_flag, nptype=nptype)
    trt.generation = generation
    trt.events = []  # ("Builder"|"Runtime"|"build"|"deserialize"|..., detail)
    trt.builds = []  # the settings of each build
    trt.deserialized = []  # the sha256 of each blob handed to deserialize_cuda_engine
    trt.fail_build = fail_build
    trt.fail_execute = fail_execute
    gpu_name = lambda: cuda.gpus[0].name if cuda.gpus else "none"  # noqa: E731

    class OnnxParser(_Recorded):
        _trt_name = "OnnxParser"

        def __init__(self, network, logger):
            self._network, self._logger, self._errors = network, logger, []

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, i):
            return self._errors[i]

        def parse_from_file(self, path):
            return self.parse(Path(path).read_bytes())

        def parse(self, data):
            import onnx  # noqa: PLC0415

            model = onnx.load_from_string(bytes(data))
            for i, node in enumerate(model.graph.node):
                if node.op_type in unsupported_ops:
                    self._errors.append(ParserError(
                        f"No importer registered for op: {node.op_type}", i, node.name,
                        node.op_type))
            if self._errors:
                return False
            inits = {t.name for t in model.graph.initializer}

            def tensor(vi):
                tt = vi.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
                return ITensor(vi.name, dims, _ONNX_TO_TRT[tt.elem_type])

            net = self._network
            net._inputs = [tensor(v) for v in model.graph.input if v.name not in inits]
            net._outputs = [tensor(v) for v in model.graph.output]
            net._onnx = bytes(data)
            net._float_types = _graph_float_types(model)
            return True

    class IBuilderConfig(_Recorded):
        _trt_name = "IBuilderConfig"

        def __init__(self):
            self._pools: dict = {}
            self._flags: set = set()
            self.builder_optimization_level = 3
            self.default_device_type = DeviceType.GPU
            self.DLA_core = -1
            self._profiles: list[IOptimizationProfile] = []
            self.progress_monitor = None
            self._timing = None

        def set_memory_pool_limit(self, pool, size):
            self._pools[pool] = size

        def get_memory_pool_limit(self, pool):
            return self._pools.get(pool, 0)

        def set_flag(self, flag):
            self._flags.add(flag)

        def get_flag(self, flag):
            return flag in self._flags

        def add_optimization_profile(self, profile):
            for lo, opt, hi in profile._shapes.values():
                ok = len(lo) == len(opt) == len(hi) and all(
                    a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True))
                if not ok or min(lo) < 0:
                    return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        @property
        def num_optimization_profiles(self):
            return len(self._profiles)

        def create_timing_cache(self, data):
            if not data:
                return ITimingCache(gpu_name(), 0)
            d = json.loads(bytes(data))
            return ITimingCache(d["device"], d["entries"])

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache._device != gpu_name() and not ignore_mismatch:
                return False
            self._timing = cache
            trt.events.append(("timing_cache_loaded", cache._entries))
            return True

        def get_timing_cache(self):
            return self._timing

    class Builder(_Recorded):
        _trt_name = "Builder"

        def __init__(self, logger):
            cuda.require_active("trt.Builder")
            trt.events.append(("Builder", gpu_name()))
            self._logger = logger
            self.num_DLA_cores = dla_cores

        def create_network(self, flags=0):
            strong = generation >= 11 or bool(flags & (1 << network_flag.STRONGLY_TYPED))
            return INetworkDefinition(flags, strong)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            cuda.require_active("build_serialized_network")
            flags = sorted(f.name for f in config._flags)
            if network._strongly_typed and _PRECISION_FLAGS & set(flags):
                self._logger.log(Severity.ERROR, f"precision flags {flags} cannot be used "
                                 f"with a strongly typed network")
                return None
            shapes = {}
            for t in network._inputs:
                if -1 in t.shape:
                    prof = config._profiles[0]._shapes if config._profiles else {}
                    if t.name not in prof:
                        self._logger.log(Severity.ERROR, f"Network has dynamic or shape "
                                         f"inputs, but no optimization profile has been "
                                         f"defined for '{t.name}'.")
                        return None
                    shapes[t.name] = prof[t.name]
                else:
                    shapes[t.name] = (t.shape, t.shape, t.shape)
            monitor = config.progress_monitor
            steps = 4
            if monitor is not None:
                monitor.phase_start("Building engine", None, steps)
                for step in range(steps):
                    if not monitor.step_complete("Building engine", step):
                        monitor.phase_finish("Building engine")
                        self._logger.log(Severity.ERROR, "Build was cancelled by the "
                                         "progress monitor.")
                        return None
                monitor.phase_finish("Building engine")
            if trt.fail_build:
                self._logger.log(Severity.ERROR, trt.fail_build)
                return None
            if config._timing is not None:
                config._timing._entries += 1
            settings = {
                "version": version,
                "device": gpu_name(),
                "typing": "strong" if network._strongly_typed else "weak",
                "network_flags": network._flags,
                "graph_types": network._float_types,
                "workspace": config._pools.get(MemoryPoolType.WORKSPACE),
                "opt_level": config.builder_optimization_level,
                "flags": flags,
                "device_type": config.default_device_type.name,
                "dla_core": config.DLA_core,
                "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
                "num_profiles": config.num_optimization_profiles,
            }
            trt.builds.append(settings)
            trt.events.append(("build", settings))
            header = json.dumps({**settings,
                                 "onnx": base64.b64encode(network._onnx).decode()})
            return IHostMemory(PLAN_MAGIC + header.encode())

    class Runtime(_Recorded):
        _trt_name = "Runtime"

        def __init__(self, logger):
            cuda.require_active("trt.Runtime")
            trt.events.append(("Runtime", gpu_name()))
            self._logger = logger
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            cuda.require_active("deserialize_cuda_engine")
            data = bytes(data)
            trt.events.append(("deserialize", len(data)))
            trt.deserialized.append(hashlib.sha256(data).hexdigest())
            if not data.startswith(PLAN_MAGIC):
                self._logger.log(Severity.ERROR, "1: [runtime.cpp::parsePlan] Error Code 1: "
                                 "Serialization (Serialization assertion plan->header."
                                 "magicTag == rt::kPLAN_MAGIC_TAG failed.)")
                return None
            header = json.loads(data[len(PLAN_MAGIC):])
            built_by = header["version"]
            compatible = ("VERSION_COMPATIBLE" in header["flags"]
                          and built_by.split(".")[0] == version.split(".")[0])
            if built_by != version and not compatible:
                self._logger.log(Severity.ERROR, f"The engine plan file is not compatible "
                                 f"with this version of TensorRT, expecting library version "
                                 f"{version} got {built_by}, please rebuild.")
                return None
            if header["device"] != gpu_name():
                self._logger.log(Severity.ERROR, "The engine plan file is generated on an "
                                 "incompatible device")
                return None
            if "VERSION_COMPATIBLE" in header["flags"] and not self.engine_host_code_allowed:
                self._logger.log(Severity.ERROR, "engine_host_code_allowed is off")
                return None
            return ICudaEngine(header)

    class ICudaEngine(_Recorded):
        _trt_name = "ICudaEngine"

        def __init__(self, header):
            import onnxruntime as ort  # noqa: PLC0415

            self.header = header
            self.onnx = base64.b64decode(header["onnx"])
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self.session = ort.InferenceSession(self.onnx, so,
                                                providers=["CPUExecutionProvider"])
            self.io = []
            for arg, mode in [(a, TensorIOMode.INPUT) for a in self.session.get_inputs()] + \
                             [(a, TensorIOMode.OUTPUT) for a in self.session.get_outputs()]:
                shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
                dtype = {"tensor(float)": DataType.FLOAT, "tensor(int64)": DataType.INT64,
                         "tensor(float16)": DataType.HALF}[arg.type]
                self.io.append((arg.name, mode, dtype, shape))
            self.contexts = []

        @property
        def num_io_tensors(self):
            return len(self.io)

        # What each execution context allocates for activations (a fixed stand-in figure)
        device_memory_size_v2 = 1 << 20

        @property
        def num_optimization_profiles(self):
            return max(1, self.header["num_profiles"])

        def _io(self, name):
            return next(t for t in self.io if t[0] == name)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return self._io(name)[1]

        def get_tensor_dtype(self, name):
            return self._io(name)[2]

        def get_tensor_shape(self, name):
            return self._io(name)[3]

        def get_tensor_profile_shape(self, name, profile_index):
            if profile_index != 0 or name not in self.header["shapes"]:
                raise RuntimeError(f"no profile shape for {name}")
            return [tuple(s) for s in self.header["shapes"][name]]

        def create_execution_context(self):
            ctx = IExecutionContext(self)
            self.contexts.append(ctx)
            return ctx

    class IExecutionContext(_Recorded):
        _trt_name = "IExecutionContext"

        def __init__(self, engine):
            cuda.require_active("create_execution_context")
            self._engine = engine
            self.input_shapes: dict[str, tuple] = {}
            self.addresses: dict[str, int] = {}
            self.shape_calls: list[tuple[str, tuple]] = []
            self.executions = 0
            self._out_shapes: dict[tuple, dict] = {}

        def set_input_shape(self, name, shape):
            shape = tuple(shape)
            lo, _opt, hi = self._engine.header["shapes"][name]
            if len(shape) != len(lo) or any(
                    not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
                return False
            self.shape_calls.append((name, shape))
            self.input_shapes[name] = shape
            return True

        @property
        def all_binding_shapes_specified(self):
            return all(n in self.input_shapes for n, m, _, _ in self._engine.io
                       if m == TensorIOMode.INPUT)

        def _outputs_for(self, shapes: dict) -> dict:
            key = tuple(sorted(shapes.items()))
            if key not in self._out_shapes:
                eng = self._engine
                feeds = {n: np.zeros(s, nptype(eng._io(n)[2])) for n, s in shapes.items()}
                outs = eng.session.run(None, feeds)
                names = [a.name for a in eng.session.get_outputs()]
                self._out_shapes[key] = {n: o.shape for n, o in zip(names, outs, strict=True)}
            return self._out_shapes[key]

        def get_tensor_shape(self, name):
            _, mode, _, static = self._engine._io(name)
            if mode == TensorIOMode.INPUT:
                return self.input_shapes.get(name, static)
            if not self.all_binding_shapes_specified:
                return tuple(-1 for _ in static)
            return tuple(self._outputs_for(self.input_shapes)[name])

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            cuda.require_active("execute_async_v3")
            eng = self._engine
            if trt.fail_execute or not self.all_binding_shapes_specified:
                return False
            if set(self.addresses) != {t[0] for t in eng.io}:
                return False
            shapes = dict(self.input_shapes)
            out_shapes = self._outputs_for(shapes)
            for name, _mode, dtype, _ in eng.io:
                shape = shapes.get(name) or out_shapes[name]
                nbytes = math.prod(shape) * np.dtype(nptype(dtype)).itemsize
                cuda.check_device_range(self.addresses[name], nbytes, f"tensor '{name}'")
            self.executions += 1

            def kernel():
                feeds = {}
                for name, s in shapes.items():
                    dt = np.dtype(nptype(eng._io(name)[2]))
                    n = math.prod(s) * dt.itemsize
                    raw = (ctypes.c_uint8 * n).from_address(self.addresses[name])
                    feeds[name] = np.frombuffer(raw, dt).reshape(s).copy()
                outs = eng.session.run(None, feeds)
                for arg, out in zip(eng.session.get_outputs(), outs, strict=True):
                    value = np.ascontiguousarray(out)
                    ctypes.memmove(self.addresses[arg.name], value.ctypes.data, value.nbytes)

            cuda.enqueue(stream_handle, kernel)
            return True

    trt.Builder, trt.Runtime, trt.OnnxParser = Builder, Runtime, OnnxParser
    # The interface classes, at module level as in the real bindings.
    trt.IBuilderConfig, trt.ICudaEngine, trt.IExecutionContext = (
        IBuilderConfig, ICudaEngine, IExecutionContext)
    trt.INetworkDefinition, trt.ITensor, trt.ParserError = INetworkDefinition, ITensor, ParserError
    trt.IOptimizationProfile, trt.ITimingCache, trt.IHostMemory = (
        IOptimizationProfile, ITimingCache, IHostMemory)
    return trt
