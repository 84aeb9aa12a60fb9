"""Delta sizes against the full release, for realistic updates of two models.

    python -m benchmarks.bench_delta [--big-mb 64] [--skip-big]

Models: the demo CNN (about 1 MB of weights) and an MLP of random weights built with
the onnx helper (``--big-mb``, default 64 MB). Updates of each: only the classifier head
retrained; every weight fine-tuned a few steps (relative noise 1e-4 and 1e-3); an fp32 ->
fp16 re-export (initializers stored as fp16, a Cast after each). For each: the full
release archive, plain zstd of it, and both delta methods of updater/delta.py (with the
time to make and to apply the smaller). The archive holds the model, a config and a
1 KiB placeholder for the samples, so the figures are the model's. Printed, never
asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.demo.models import cnn_model, save_model  # noqa: E402
from updater import delta  # noqa: E402
from updater.fleet_repo import build_release_archive  # noqa: E402


def big_mlp(path: Path, megabytes: int) -> Path:
    """Gemm layers 1024 -> H -> H -> 256 (the head) with H chosen for ``megabytes``."""
    from onnx import TensorProto, helper, numpy_helper

    floats = megabytes * (1 << 20) // 4
    hidden = int((-(1024 + 256) + ((1024 + 256) ** 2 + 4 * floats) ** 0.5) / 2)
    dims = [1024, hidden, hidden, 256]
    rng = np.random.default_rng(3)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(dims[i + 1], np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1024])],
        [helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["batch", 256])],
        initializer=inits)
    return save_model(graph, path)


def _with(model_bytes: bytes, change) -> bytes:
    """The model with each float initializer replaced by change(name, array, is_head)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load_model_from_string(model_bytes)
    inits = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]
    head = {inits[-2].name, inits[-1].name}  # the last layer's weight and bias
    for t in inits:
        new = change(t.name, numpy_helper.to_array(t), t.name in head)
        if new is not None:
            t.CopyFrom(numpy_helper.from_array(new.astype(np.float32), t.name))
    return proto.SerializeToString()


def head_retrained(model: bytes) -> bytes:
    rng = np.random.default_rng(1)
    return _with(model, lambda _n, w, head: (w + rng.standard_normal(w.shape) * 0.05)
                 if head else None)


def fine_tuned(relative: float):
    def make(model: bytes) -> bytes:
        rng = np.random.default_rng(2)
        return _with(model, lambda _n, w, _h: w * (1 + relative * rng.standard_normal(
            w.shape)))
    return make


def fp16_export(model: bytes) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load_model_from_string(model)
    casts = []
    for t in proto.graph.initializer:
        if t.data_type != TensorProto.FLOAT:
            continue
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                           t.name))
        casts.append(helper.make_node("Cast", [t.name], [f"{t.name}_fp32"],
                                      to=TensorProto.FLOAT))
        for node in proto.graph.node:
            node.input[:] = [f"{t.name}_fp32" if i == t.name else i for i in node.input]
    nodes = [*casts, *proto.graph.node]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto.SerializeToString()


def archive_of(model: bytes, tmp: Path) -> bytes:
    (tmp / "model.onnx").write_bytes(model)
    (tmp / "config.toml").write_text("max_batch_size = 8\n")
    (tmp / "samples.npz").write_bytes(bytes(1024))
    return build_release_archive(tmp / "model.onnx", tmp / "config.toml", tmp / "samples.npz")


def measure(label: str, old: bytes, update, tmp: Path) -> None:
    from backports import zstd

    new = update(old)
    archive = archive_of(new, tmp)
    plain = len(zstd.compress(archive, 9))
    t0 = time.perf_counter()
    method, patch, sizes = delta.best_delta(archive, old, new)
    made_s = time.perf_counter() - t0
    (tmp / "base").write_bytes(old)
    (tmp / "delta").write_bytes(patch)
    (tmp / "out").unlink(missing_ok=True)
    t0 = time.perf_counter()
    delta.apply_delta(tmp / "delta", tmp / "base", tmp / "out", len(archive))
    apply_s = time.perf_counter() - t0
    assert (tmp / "out").read_bytes() == archive  # a broken delta is no figure at all
    n = len(archive)
    print(f"{label:<38} {n / 1e6:>8.2f} MB  zstd {plain / n:>6.1%}  "
          f"zstd-patch {sizes['zstd-patch'] / n:>6.1%}  xor-planes {sizes['xor-planes'] / n:>6.1%}"
          f"  kept {method:<10} make {made_s:5.1f} s  apply {apply_s:5.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-mb", type=int, default=64)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    updates = [("head retrained", head_retrained),
               ("fine-tuned, relative 1e-4", fine_tuned(1e-4)),
               ("fine-tuned, relative 1e-3", fine_tuned(1e-3)),
               ("fp32 -> fp16 re-export", fp16_export)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = [("demo CNN", cnn_model(tmp / "cnn.onnx"))]
        if not args.skip_big:
            models.append((f"MLP {args.big_mb} MB", big_mlp(tmp / "big.onnx", args.big_mb)))
        print("sizes as a share of the full release archive (smaller is better)")
        for name, path in models:
            old = path.read_bytes()
            for label, update in updates:
                measure(f"{name}: {label}", old, update, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
