"""Tiny ONNX models for version, traffic and ensemble tests; each answer is predictable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 16


def _save(nodes, inputs, outputs, inits, path: Path) -> Path:
    g = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _io(name: str, width: int = WIDTH):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width])


def add_const(path: Path, c: float) -> Path:
    """y = x + c: version c of a model answers with its own number added."""
    k = numpy_helper.from_array(np.full((WIDTH,), c, np.float32), "k")
    return _save([helper.make_node("Add", ["x", "k"], ["y"])], [_io("x")], [_io("y")], [k],
                 path)


def head(path: Path, seed: int, classes: int = 4, in_name: str = "y") -> Path:
    """probs = softmax(x @ W): a classifier head over the add_const outputs."""
    w = np.random.default_rng(seed).standard_normal((WIDTH, classes)).astype(np.float32)
    return _save([helper.make_node("MatMul", [in_name, "w"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
                 [_io(in_name)], [_io("probs", classes)],
                 [numpy_helper.from_array(w, "w")], path)


def head_weights(seed: int, classes: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((WIDTH, classes)).astype(np.float32)


def failing_at_run(path: Path) -> Path:
    """Passes onnx.checker and loads, but every run fails: 16 values can't be 7 rows."""
    shape = numpy_helper.from_array(np.array([7, -1], np.int64), "shape")
    return _save([helper.make_node("Reshape", ["x", "shape"], ["r"]),
                  helper.make_node("Reshape", ["r", "back"], ["y"])],
                 [_io("x")], [_io("y")],
                 [shape, numpy_helper.from_array(np.array([-1, WIDTH], np.int64), "back")],
                 path)


def failing_on_large(path: Path) -> Path:
    """Loads and warms up (on zeros), but fails when x[0, 0] >= 16: it uses x[0, 0] as a
    column index, and ONNX Runtime refuses an index out of range."""
    starts = numpy_helper.from_array(np.array([0, 0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1, 1], np.int64), "ends")
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    return _save([helper.make_node("Slice", ["x", "starts", "ends"], ["corner"]),
                  helper.make_node("Cast", ["corner"], ["ci"], to=TensorProto.INT64),
                  helper.make_node("Reshape", ["ci", "one"], ["idx"]),
                  helper.make_node("Gather", ["x", "idx"], ["col"], axis=1),
                  helper.make_node("Add", ["x", "col"], ["y"])],
                 [_io("x")], [_io("y")], [starts, ends, one], path)


def wrong_width(path: Path) -> Path:
    """Same input as add_const, but answers with 8 columns instead of 16."""
    idx = numpy_helper.from_array(np.arange(8, dtype=np.int64), "idx")
    return _save([helper.make_node("Gather", ["x", "idx"], ["y"], axis=1)],
                 [_io("x")], [_io("y", 8)], [idx], path)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
