"""The embedded demo models, made with the onnx helper API (no download, no GPU).

- ``identity``: y = x + 0 on float32 [batch, 16] (the protocol's own cost, nearly no compute)
- ``cnn``: a small convolutional image classifier, float32 [batch, 3, 224, 224] -> 10
  class probabilities; a few ms an image on one CPU core
- ``mlp``: a tabular classifier, float32 [batch, 32] -> 3 class probabilities

Weights come from a fixed seed, so every build of a model is byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 17
DEMO_MODELS = ("identity", "cnn", "mlp")


def _onnx():
    import onnx  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    return onnx, TensorProto, helper, numpy_helper


def save_model(graph, path: Path) -> Path:
    """An ONNX graph as a checked model file at ``path`` (the opset the demo models use)."""
    onnx, _, helper, _ = _onnx()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="outpost-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path, width: int = 16) -> Path:
    _, TensorProto, helper, numpy_helper = _onnx()
    zero = numpy_helper.from_array(np.zeros((width,), np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[zero],
    )
    return save_model(graph, path)


def cnn_model(path: Path, classes: int = 10, seed: int = 7) -> Path:
    """Four 3x3 conv + relu layers (3->32 /2, 32->64 /2, 64->128 /2, 128->128 /1), global
    average pool, dense 128->classes, softmax. About 0.5 GFLOP an image."""
    _, TensorProto, helper, numpy_helper = _onnx()
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    channels = [3, 32, 64, 128, 128]
    strides = [2, 2, 2, 1]
    prev = "image"
    for i in range(4):
        cin, cout = channels[i], channels[i + 1]
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(
            np.float32)
        b = np.zeros(cout, np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}_w"),
                  numpy_helper.from_array(b, f"conv{i}_b")]
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}_w", f"conv{i}_b"], [f"c{i}"],
                                      kernel_shape=[3, 3], strides=[strides[i]] * 2,
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc_w = (rng.standard_normal((channels[-1], classes)) * 0.1).astype(np.float32)
    fc_b = (rng.standard_normal(classes) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(fc_w, "fc_w"), numpy_helper.from_array(fc_b, "fc_b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    return save_model(graph, path)


def mlp_model(path: Path, features: int = 32, hidden: int = 64, classes: int = 3,
              seed: int = 11) -> Path:
    _, TensorProto, helper, numpy_helper = _onnx()
    rng = np.random.default_rng(seed)
    dims = [features, hidden, hidden, classes]
    nodes, inits = [], []
    prev = "features"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        b = np.zeros(dims[i + 1], np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"]))
            prev = f"a{i}"
    nodes.append(helper.make_node("Softmax", ["h2"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    return save_model(graph, path)


BUILDERS = {"identity": identity_model, "cnn": cnn_model, "mlp": mlp_model}


def sample_inputs(name: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and shapes for a demo model."""
    rng = np.random.default_rng(seed)
    if name == "identity":
        return {"x": rng.standard_normal((batch, 16)).astype(np.float32)}
    if name == "cnn":
        return {"image": rng.random((batch, 3, 224, 224), dtype=np.float32)}
    if name == "mlp":
        return {"features": rng.standard_normal((batch, 32)).astype(np.float32)}
    raise KeyError(name)


def write_demo_models(folder: Path) -> dict[str, Path]:
    return {name: build(folder / f"{name}.onnx") for name, build in BUILDERS.items()}


def ensure_demo_models(repo, defaults) -> list[str]:
    """Add each demo model the repository lacks; returns the names added. None needs a
    config of its own: how each runs best here is measured at its first load."""
    import tempfile  # noqa: PLC0415

    have = {m.name for m in repo.models()}
    added = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in BUILDERS.items():
            if name in have:
                continue
            repo.add(name, build(Path(tmp) / f"{name}.onnx"), defaults=defaults)
            added.append(name)
    return added
