"""The model repository: checks, config completion, immutable versions, removal."""

from __future__ import annotations

import os

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from appliance.models.repository import Repository


def test_add_completes_config_from_graph(short_tmp, demo_files):
    repo = Repository(short_tmp)
    rec = repo.add("cnn", demo_files["cnn"])
    assert rec.version == 1 and rec.path == short_tmp / "models" / "cnn" / "1"
    cfg = rec.config()
    # instances left to the layout measured at load ("auto", the built-in default)
    assert cfg.max_batch_size == 32 and cfg.instances is None
    assert cfg.dynamic_batching.auto_preferred_batch is None  # the appliance's, at load
    assert [(t.name, t.dtype, t.dims) for t in cfg.input] == [
        ("image", "float32", (3, 224, 224))]
    assert cfg.input_specs()[0].shape == (-1, 3, 224, 224)
    assert (rec.path / "model.onnx").read_bytes() == demo_files["cnn"].read_bytes()
    rec2 = repo.add("cnn", demo_files["cnn"])
    assert rec2.version == 2
    assert repo.model("cnn").active_version == 2
    rec3 = repo.add("cnn", demo_files["cnn"], activate=False)
    assert repo.model("cnn").active_version == 2 and rec3.version == 3
    assert not any((short_tmp / "staging" / "repo").iterdir())


def test_existing_version_is_immutable(short_tmp, demo_files):
    repo = Repository(short_tmp)
    repo.add("m", demo_files["mlp"], version=5)
    with pytest.raises(FailedPrecondition, match="immutable"):
        repo.add("m", demo_files["identity"], version=5)
    assert repo.version("m", 5).sha256 == repo.add("x", demo_files["mlp"]).sha256


def test_model_config_overrides_and_contradictions(short_tmp, demo_files):
    repo = Repository(short_tmp)
    cfg = short_tmp / "c.toml"
    cfg.write_text("max_batch_size = 8\ninstances = 2\n[dynamic_batching]\n"
                   "max_queue_delay_us = 500\npreferred_batch_sizes = [4, 8]\n")
    rec = repo.add("mlp", demo_files["mlp"], config_path=cfg)
    c = rec.config()
    assert (c.max_batch_size, c.instances) == (8, 2)
    assert c.dynamic_batching.preferred_batch_sizes == (4, 8)
    assert c.dynamic_batching.max_queue_delay_us == 500
    for text, words in [
        ("max_batch_size = 8\nbogus = 1\n", ("unknown key 'bogus'", "c.toml")),
        ("max_batch_size = 'eight'\n", ("max_batch_size", "integer")),
        ("[[input]]\nname = 'features'\ndtype = 'float64'\n", ("float32", "cast")),
        ("[[input]]\nname = 'nope'\n", ("'nope'", "features")),
        ("[[input]]\nname = 'features'\ndims = [31]\n", ("dims",)),
        ("max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = [8]\n",
         ("preferred_batch_sizes",)),
        ("[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 2\n",
         ("default_priority_level",)),
        ("max_batch_size = 8\n[", ("not valid TOML",)),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError) as e:
            repo.add("mlp", demo_files["mlp"], config_path=cfg)
        for w in words:
            assert w in str(e.value), (text, str(e.value))
    assert [v.version for v in repo.model("mlp").versions] == [1]  # nothing half-added


def _fixed_batch_model(path):
    w = numpy_helper.from_array(__import__("numpy").ones((4,), "float32"), "w")
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "fixed",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_model_without_batch_dim(short_tmp):
    repo = Repository(short_tmp)
    rec = repo.add("fixed", _fixed_batch_model(short_tmp / "f.onnx"))
    assert rec.config().max_batch_size == 0
    assert rec.config().input_specs()[0].shape == (2, 4)
    cfg = short_tmp / "c.toml"
    cfg.write_text("max_batch_size = 4\n")
    with pytest.raises(ConfigError, match="dynamic dim 0"):
        repo.add("fixed", short_tmp / "f.onnx", config_path=cfg)


def test_bad_files_are_refused(short_tmp, demo_files):
    repo = Repository(short_tmp)
    junk = short_tmp / "junk.onnx"
    junk.write_bytes(b"this is not protobuf at all \x00\xff" * 10)
    with pytest.raises(InvalidArgument, match="junk.onnx"):
        repo.add("j", junk)
    with pytest.raises(InvalidArgument, match="no such model file"):
        repo.add("j", short_tmp / "missing.onnx")
    for bad in ("", "../evil", ".hidden", "a/b", "x" * 200):
        with pytest.raises(InvalidArgument, match="model name"):
            repo.add(bad, demo_files["mlp"])
    # An op no ONNX schema knows.
    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(short_tmp / "badop.onnx"))
    with pytest.raises(InvalidArgument, match="onnx.checker"):
        repo.add("b", short_tmp / "badop.onnx")
    assert repo.models() == []


def _external_model(folder, location):
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "ext",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4096])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4096])],
                          initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    if location != "weights.bin":
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_external_data_is_copied_and_must_stay_inside(short_tmp):
    repo = Repository(short_tmp / "data")
    rec = repo.add("ext", _external_model(short_tmp / "ok", "weights.bin"))
    assert (rec.path / "weights.bin").stat().st_size == 4096 * 4
    (short_tmp / "secret.bin").write_bytes(b"\0" * 16384)
    for loc in ("../secret.bin", str(short_tmp / "secret.bin")):
        path = _external_model(short_tmp / f"evil{len(loc)}", loc)
        with pytest.raises(InvalidArgument, match="outside the model's directory"):
            repo.add("evil", path)
    assert [m.name for m in repo.models()] == ["ext"]


def test_remove_version_and_model(short_tmp, demo_files):
    repo = Repository(short_tmp)
    repo.add("m", demo_files["mlp"])
    repo.add("m", demo_files["mlp"])
    with pytest.raises(FailedPrecondition, match="active"):
        repo.remove("m", 2)
    assert repo.remove("m", 1) == [1]
    assert not (short_tmp / "models" / "m" / "1").exists()
    assert [v.version for v in repo.model("m").versions] == [2]
    assert repo.remove("m") == [2]
    assert not (short_tmp / "models" / "m").exists()
    with pytest.raises(NotFound):
        repo.model("m")
    with pytest.raises(NotFound):
        repo.remove("m")


def test_versions_survive_reopen_and_leftover_staging_is_cleaned(short_tmp, demo_files):
    repo = Repository(short_tmp)
    repo.add("m", demo_files["mlp"])
    repo.close()
    leftover = short_tmp / "staging" / "repo" / "m-9-deadbeef"
    leftover.mkdir(parents=True)
    old = 1_000_000_000
    os.utime(leftover, (old, old))
    repo = Repository(short_tmp)
    repo.clean_staging()
    assert not leftover.exists()
    assert repo.model("m").active_version == 1
