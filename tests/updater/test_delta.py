"""updater/delta.py on its own: both methods rebuild byte for byte, and a bad patch is
refused with the output file removed (corrupt payload, a bomb past the signed length, a
header that lies)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from updater import delta as d


def _have_zstd() -> bool:
    try:
        d._zstd()
    except d.DeltaError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_zstd(), reason="deltas need backports.zstd "
                                "(or Python 3.14); pyproject.toml must list it")


def _model(weights: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(weights, "w")])
    return helper.make_model(graph).SerializeToString()


@pytest.fixture
def pair(tmp_path):
    w = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    old = _model(w)
    new = _model(w * (1 + 1e-4 * np.random.default_rng(1).standard_normal(w.shape)
                      ).astype(np.float32))
    archive = b"header" * 100 + new + b"trailer"
    (tmp_path / "base").write_bytes(old)
    return tmp_path, old, new, archive


@pytest.mark.parametrize("method", d.METHODS)
def test_each_method_rebuilds_the_archive_exactly(pair, method):
    tmp, old, new, archive = pair
    (tmp / "delta").write_bytes(d.make_delta(archive, old, new, method))
    d.apply_delta(tmp / "delta", tmp / "base", tmp / "out", len(archive))
    assert (tmp / "out").read_bytes() == archive


def test_xor_planes_wins_on_a_fine_tune(pair):
    _, old, new, archive = pair
    method, _, sizes = d.best_delta(archive, old, new)
    assert method == "xor-planes" and sizes["xor-planes"] < 0.7 * sizes["zstd-patch"]


def _patch(header: dict, payload: bytes) -> bytes:
    return d.MAGIC + json.dumps(header).encode() + b"\n" + payload


@pytest.mark.parametrize("case", ["corrupt", "bomb", "short", "region", "magic"])
def test_a_bad_patch_is_refused_and_nothing_is_left(pair, case):
    tmp, old, new, archive = pair
    good = d.make_delta(archive, old, new, "zstd-patch")
    patch = {
        "corrupt": good[:-40] + bytes(40),
        # 64 MiB of zeros from a few KiB: stopped at the signed length, not written out
        "bomb": _patch({"method": "zstd-patch", "length": len(archive), "regions": []},
                       d._compress(bytes(64 << 20), old)),
        "short": _patch({"method": "zstd-patch", "length": len(archive), "regions": []},
                        d._compress(archive[:-10], old)),
        "region": _patch({"method": "xor-planes", "length": len(archive),
                          "regions": [[len(archive) - 4, 8, 0, 4]]}, d._compress(archive, old)),
        "magic": b"PK" + good,
    }[case]
    (tmp / "delta").write_bytes(patch)
    with pytest.raises(d.DeltaError) as err:
        d.apply_delta(tmp / "delta", tmp / "base", tmp / "out", len(archive))
    assert str(tmp / "delta") in str(err.value)
    assert not (tmp / "out").exists()
    if case == "bomb":
        assert "expands past the signed" in str(err.value)
