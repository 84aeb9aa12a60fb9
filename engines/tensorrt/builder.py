"""ONNX to a serialized TensorRT plan with the TensorRT 10 and 11 Python APIs.

Parse (naming every node the parser refused) into a network typed as the precision path
says (``engines.tensorrt.precision``: strongly typed from TensorRT 10.12, weakly typed with
precision flags before), configure from the firmware profile's build fields (workspace
pool, optimisation level, DLA core and GPU fallback, version-compatible), one optimisation
profile covering batch 1..max_batch_size plus the
declared dynamic dims, the device's persistent timing cache, and progress reported through
TensorRT's IProgressMonitor. Every failure is a PrepareError or ModelInvalid whose message
says what failed and what to try.

``trt`` is the tensorrt module, passed in so tests can hand a stand-in that follows the
same documented API. Call this only after a GPU was found: see ``engines.tensorrt.probe``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from engines.base import BuildOptions
from engines.errors import ModelInvalid, PrepareError
from engines.files import atomic_write_bytes
from engines.tensorrt.precision import PrecisionPath


class BuildProgress(Protocol):
    """What the CLI's progress bar implements (the shape of IProgressMonitor)."""

    def phase_start(self, phase: str, parent: str | None, steps: int) -> None: ...

    def step_complete(self, phase: str, step: int) -> bool: ...  # False cancels the build

    def phase_finish(self, phase: str) -> None: ...


def make_logger(trt):
    """An ILogger that keeps warnings and errors, so failures can quote TensorRT itself."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[tuple[str, str]] = []
            self._lock = threading.Lock()

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                name = getattr(severity, "name", str(severity))
                with self._lock:
                    self.lines.append((name, str(msg)))

        def errors(self) -> list[str]:
            return [m for s, m in self.lines if s in ("ERROR", "INTERNAL_ERROR")]

    return CollectingLogger()


def _monitor(trt, progress: BuildProgress):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return bool(progress.step_complete(phase_name, step))

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return Monitor()


def has_qdq(model_path: Path) -> bool:
    """Whether the ONNX graph is explicitly quantized (int8 needs QuantizeLinear nodes)."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def network_flags(trt, path: PrecisionPath) -> int:
    """The create_network flags of ``path``: STRONGLY_TYPED on 10.12 to 10.x, none on 11
    (always strongly typed there), EXPLICIT_BATCH before 10."""
    flags = 0
    for name in path.network_flags:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is None:
            raise PrepareError(f"TensorRT {trt.__version__} has no "
                               f"NetworkDefinitionCreationFlag.{name}, which a {path.typing}ly "
                               f"typed build on this version needs; reinstall TensorRT")
        flags |= 1 << int(member)
    return flags


def parse_onnx(trt, builder, logger, model_path: Path, path: PrecisionPath,
               shown: Path | None = None):
    """The network definition, or ModelInvalid naming each node the parser refused
    (``shown``: the model the user gave, when ``model_path`` is its converted graph)."""
    network = builder.create_network(network_flags(trt, path))
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(model_path)):
        return network, parser
    problems, ops = [], []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        op = _call(err, "node_operator")
        node = _call(err, "node_name") or (f"#{err.node()}" if err.node() >= 0 else "")
        where = f"node '{node}' ({op})" if op else (f"node '{node}'" if node else "the graph")
        problems.append(f"{where}: {err.desc()}")
        if op:
            ops.append(op)
    if not problems:
        problems = logger.errors()[-3:] or ["the parser gave no reason"]
    hint = (f"TensorRT {trt.__version__} does not support "
            f"{', '.join(sorted(set(ops)))} as exported here: re-export with another opset, "
            f"replace the op, or serve this model with engine = \"onnxruntime\""
            if ops else "check the file with onnx.checker, or re-export it")
    raise ModelInvalid(f"TensorRT's ONNX parser rejected {shown or model_path}: "
                       f"{'; '.join(problems)}. {hint}")


def _call(obj, method: str) -> str:
    fn = getattr(obj, method, None)  # node_name/node_operator arrived in TensorRT 8.6
    try:
        return str(fn()) if fn is not None else ""
    except Exception:
        return ""


def shape_profile(network, options: BuildOptions) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min/opt/max per dynamic network input: batch 1..max, then the declared ranges."""
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        name, dims = tensor.name, tuple(tensor.shape)
        if -1 not in dims:
            continue
        declared = options.shape_ranges.get(name)
        if declared is not None:
            if not (len(declared.min) == len(declared.opt) == len(declared.max) == len(dims)):
                raise PrepareError(f"the shape range of input '{name}' has "
                                   f"{len(declared.min)} dims but the input has {len(dims)}")
            shapes[name] = (tuple(declared.min), tuple(declared.opt), tuple(declared.max))
            continue
        lo, opt, hi = list(dims), list(dims), list(dims)
        if dims[0] == -1 and options.max_batch_size > 0:
            lo[0] = 1
            opt[0] = min(max(1, options.opt_batch_size), options.max_batch_size)
            hi[0] = options.max_batch_size
        rest = [d for d, v in enumerate(hi) if v == -1]
        if rest:
            raise PrepareError(
                f"input '{name}' has shape {list(dims)} with dynamic dim {rest[0]} and no "
                f"declared range; give the input fixed dims in the model's config.toml"
                + ("" if options.max_batch_size else
                   ", or a max_batch_size if dim 0 is the batch"))
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def configure(trt, builder, network, options: BuildOptions, path: PrecisionPath):
    """The builder config for these options; PrepareError when the device can't honour them."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if hasattr(config, "builder_optimization_level"):  # TensorRT 8.6+
        config.builder_optimization_level = int(options.optimization_level)
    for name in path.builder_flags:  # weak typing only: strong typing takes none of them
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise PrepareError(f"TensorRT {trt.__version__} has no BuilderFlag.{name} for "
                               f"precision {path.precision}; set precision = \"fp32\" in "
                               f"the profile, or install TensorRT 10.12 or later")
        config.set_flag(flag)
    if options.dla_core >= 0:
        available = int(getattr(builder, "num_DLA_cores", 0))
        if options.dla_core >= available:
            raise PrepareError(
                f"the profile asks for DLA core {options.dla_core} but this device has "
                f"{available}; set dla_core = -1 in the profile")
        if options.precision == "fp32":
            raise PrepareError("DLA runs fp16 or int8 only; set precision = \"fp16\" in the "
                               "profile, or dla_core = -1")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
        if options.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    shapes = shape_profile(network, options)
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise PrepareError(
                f"TensorRT refused the optimisation profile "
                f"{ {n: [list(s) for s in v] for n, v in shapes.items()} } (min <= opt <= max, "
                f"all positive, is required); check max_batch_size and the declared ranges")
    return config


def _attach_timing_cache(config, path: Path | None):
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another device or TensorRT version: start a fresh one.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_plan(trt, model_path: Path, options: BuildOptions, path: PrecisionPath, *,
               timing_cache: Path | None = None, progress: BuildProgress | None = None,
               shown: Path | None = None) -> bytes:
    """Serialized plan bytes for ``model_path`` (already converted when ``path`` says so;
    ``shown`` names the user's model in errors) built with ``options`` on this GPU."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, logger, model_path, path, shown)
    config = configure(trt, builder, network, options, path)
    _attach_timing_cache(config, timing_cache)
    monitor = None
    if progress is not None and hasattr(config, "progress_monitor"):  # TensorRT 10+
        monitor = _monitor(trt, progress)
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PrepareError(_build_failure(trt, shown or model_path, options, path,
                                          logger.errors()))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    del monitor  # it must outlive the build (TensorRT holds a raw pointer until now)
    return bytes(plan)


def _build_failure(trt, model_path: Path, options: BuildOptions, path: PrecisionPath,
                   errors: list[str]) -> str:
    said = " | ".join(errors[-3:]) or "TensorRT gave no reason"
    text = " ".join(errors).lower()
    tries = []
    if "could not find any implementation" in text or "insufficient" in text \
            or "out of memory" in text or "workspace" in text:
        tries.append(f"a larger workspace (workspace_mb; now "
                     f"{options.workspace_bytes >> 20} MiB) or a smaller max_batch_size "
                     f"(now {options.max_batch_size})")
    if "cancel" in text:
        tries.append("let the build finish (it was cancelled)")
    if options.precision != "fp32":
        tries.append("precision = \"fp32\"")
    elif "unsupported" in text or "could not find any implementation" in text:
        tries.append("precision = \"fp16\"")
    tries.append("another opset when exporting, or engine = \"onnxruntime\"")
    return (f"TensorRT {trt.__version__} could not build {model_path} "
            f"(precision {options.precision}, {path.typing}ly typed, workspace "
            f"{options.workspace_bytes >> 20} MiB): "
            f"{said}. Try: {'; '.join(tries)}")
