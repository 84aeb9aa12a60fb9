"""The ONNX graph converted to fp16 mixed precision, for strongly typed TensorRT builds.

The converter is onnxconverter-common's float16 conversion, with the model's inputs and
outputs kept fp32 (so clients, samples and the session's specs are unchanged) and values
clamped only at fp16's own limit (65504; the library's default clamps at 1e4). It was
chosen over NVIDIA ModelOpt's AutoCast, which gives the same numbers on the demo models but
needs torch, CUDA wheels and onnxruntime-gpu (6.5 GB installed): docs/tensorrt.md has the
figures. What AutoCast would do itself, keep ranges that overflow fp16 in fp32, is here a
refusal with the fp32 fallback offered (``engines.tensorrt.fp16_check``).

A converted graph is cached beside the plans as ``<key>.onnx``, the key naming the source
model, the converter and its version, so a rebuild (another TensorRT, another batch range)
does not convert again and an operator can see what was built.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from engines.base import BuildOptions, file_sha256
from engines.cache import cache_key, get_or_build
from engines.errors import PrepareError
from engines.tensorrt.fp16_check import FP16_MAX, check_constants, check_converted

log = logging.getLogger("outpost.engines")

PACKAGE = "onnxconverter-common"
MODULE = "onnxconverter_common.float16"


@dataclass(frozen=True)
class Converter:
    """The loaded float16 converter: its name and version go into cache keys."""

    module: object
    version: str

    @property
    def id(self) -> str:
        return f"{PACKAGE} {self.version}"


def load_converter(precision: str, trt_version: str) -> Converter:
    """The converter for ``precision``, or PrepareError naming what to install or change."""
    if precision != "fp16":
        raise PrepareError(
            f"precision {precision} on TensorRT {trt_version} needs the graph converted to "
            f"{precision}, and outpost's converter ({PACKAGE}) converts to fp16 only: set "
            f"precision = \"fp16\" (or \"fp32\") in the profile")
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        raise PrepareError(
            f"precision fp16 on TensorRT {trt_version} builds a strongly typed network from "
            f"a graph converted to fp16 by {PACKAGE}, which is not installed here ({exc}): "
            f"pip install {PACKAGE}, or set precision = \"fp32\" in the profile") from exc
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # a frozen build without its metadata
        version = str(getattr(importlib.import_module("onnxconverter_common"),
                              "__version__", "unknown"))
    return Converter(module, version)


def converted_key(source_sha256: str, precision: str, converter: str) -> str:
    return cache_key(source_sha256=source_sha256, kind=f"onnx-{precision}",
                     engine_version=converter, device={},
                     build_fields={"keep_io_types": True, "max_finite_val": FP16_MAX})


def fp16_graph(converter: Converter, model_path: Path, options: BuildOptions,
               cache_dir: Path) -> Path:
    """The fp16 graph of ``model_path``: cached in ``cache_dir``, checked when made."""
    model_path = Path(model_path)
    source = file_sha256(model_path)
    key = converted_key(source, "fp16", converter.id)
    meta = {"kind": "onnx-fp16", "converter": converter.id, "source_sha256": source}
    path, built = get_or_build(Path(cache_dir), key, ".onnx",
                               lambda: _convert(converter, model_path, options), meta=meta)
    if built:
        log.info("graph converted to fp16", extra={"model": str(model_path),
                                                   "converted": str(path),
                                                   "converter": converter.id})
    return path


def _convert(converter: Converter, model_path: Path, options: BuildOptions) -> bytes:
    import onnx  # noqa: PLC0415

    model = onnx.load(str(model_path))
    if _holds_fp16(model.graph):
        # Its author already chose where fp16 goes: the graph is built as it is.
        return model.SerializeToString()
    check_constants(model, str(model_path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "will be truncated": checked above and below
            converted = converter.module.convert_float_to_float16(
                model, keep_io_types=True, max_finite_val=FP16_MAX)
    except Exception as exc:  # the converter's own refusal: any type, one line here
        raise PrepareError(
            f"{PACKAGE} {converter.version} could not convert {model_path} to fp16 "
            f"({type(exc).__name__}: {exc}); set precision = \"fp32\" in the profile"
        ) from exc
    check_converted(model, converted, options, model_path)
    return converted.SerializeToString()


def _holds_fp16(graph) -> bool:
    fp16 = 10  # onnx.TensorProto.FLOAT16
    return (any(t.data_type == fp16 for t in graph.initializer)
            or any(v.type.tensor_type.elem_type == fp16
                   for v in [*graph.input, *graph.output, *graph.value_info])
            or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16
                                               for a in n.attribute) for n in graph.node))
