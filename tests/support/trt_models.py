"""Small ONNX models for the TensorRT precision paths: an explicitly quantized (Q/DQ) one,
and two that fp16 breaks (a constant past 65504, an intermediate that overflows); and the
skip for tests of the strongly typed fp16 path where its converter is not installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

CONVERTER_INSTALLED = importlib.util.find_spec("onnxconverter_common") is not None
needs_converter = pytest.mark.skipif(
    not CONVERTER_INSTALLED,
    reason="onnxconverter-common is not installed: strongly typed fp16 builds (TensorRT "
           "10.12 and later) convert the graph with it; pip install onnxconverter-common")


def _save(path: Path, nodes, inits, width: int = 4) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    from appliance.demo.models import save_model

    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return save_model(graph, path)


def qdq_model(path: Path) -> Path:
    """y = dequantize(quantize(x)) @ w: int8 where the Q/DQ pair is, fp32 elsewhere."""
    from onnx import helper

    w = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    return _save(path, [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"], name="dequant"),
        helper.make_node("MatMul", ["dq", "w"], ["y"], name="matmul"),
    ], {"scale": np.float32(0.05), "zero": np.int8(0), "w": w})


def big_constant_model(path: Path) -> Path:
    """y = (x + 100000) - 100000: fine in fp32, the constant is past fp16's 65504."""
    from onnx import helper

    return _save(path, [helper.make_node("Add", ["x", "big"], ["shifted"], name="shift"),
                        helper.make_node("Sub", ["shifted", "big"], ["y"], name="unshift")],
                 {"big": np.full(4, 1e5, np.float32)})


def overflowing_model(path: Path) -> Path:
    """y = x * 1000 * 1000 / 1000 / 1000 = x: every constant fits fp16, but the product
    reaches about 1e6 for inputs near 1 and overflows fp16 in between."""
    from onnx import helper

    return _save(path, [helper.make_node("Mul", ["x", "k"], ["a"], name="scale_up"),
                        helper.make_node("Mul", ["a", "k"], ["b"], name="scale_up_again"),
                        helper.make_node("Div", ["b", "k"], ["c"], name="scale_down"),
                        helper.make_node("Div", ["c", "k"], ["y"], name="scale_down_again")],
                 {"k": np.float32(1000.0)})
