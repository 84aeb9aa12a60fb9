"""Reduced precision on both TensorRT generations: weakly typed flags before 10.12, a strongly
typed network from a graph converted to fp16 from 10.12 (11.x has no other way); what is
refused (an fp16 conversion that overflows, no converter, Q/DQ under fp16), what the cache
keeps apart (the other generation's plans), and what `outpost compile` and `outpost info`
say. Against tests/support/trt_standin.py; ONNX Runtime computes what each plan's graph
gives."""

from __future__ import annotations

import hashlib
import importlib.abc
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from appliance.demo.models import sample_inputs
from engines import BuildOptions, RuntimeOptions
from engines.cache import meta_path
from engines.errors import ConversionRefused, PrepareError
from engines.tensorrt import TensorRTEngine
from engines.tensorrt.precision import precision_path
from tests.support.trt_models import (
    big_constant_model,
    needs_converter,
    overflowing_model,
    qdq_model,
)
from tests.support.trt_standin import StandinCuda, make_trt

FP16 = BuildOptions(precision="fp16", max_batch_size=4, opt_batch_size=2)


def engine(generation: int, version: str | None = None):
    cuda = StandinCuda()
    trt = make_trt(cuda, generation=generation, version=version)
    return TensorRTEngine(trt=trt, cuda=cuda), trt


def run_reference(model, feeds):
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


# -- which path each TensorRT takes ---------------------------------------------------------


@pytest.mark.parametrize("version, precision, typing, network, flags, convert", [
    ("8.5.2.2", "fp16", "weak", ("EXPLICIT_BATCH",), ("FP16",), None),  # JetPack 5
    ("10.3.0.30", "fp16", "weak", (), ("FP16",), None),  # JetPack 6
    ("10.11.0.33", "int8", "weak", (), ("INT8", "FP16"), None),
    ("10.11.0.33", "bf16", "weak", (), ("BF16",), None),
    ("10.12.0.36", "fp16", "strong", ("STRONGLY_TYPED",), (), "fp16"),
    ("10.13.0.35", "int8", "strong", ("STRONGLY_TYPED",), (), None),
    ("10.13.0.35", "fp32", "strong", ("STRONGLY_TYPED",), (), None),
    ("11.4.0.106", "fp16", "strong", (), (), "fp16"),
    ("11.4.0.106", "int8", "strong", (), (), None),
])
def test_the_path_follows_the_version(version, precision, typing, network, flags, convert):  # noqa: PLR0917
    path = precision_path(version, precision)
    assert (path.typing, path.network_flags, path.builder_flags, path.convert_to) == (
        typing, network, flags, convert)
    assert path.trt_major == int(version.split(".")[0])


@pytest.mark.parametrize("generation, version, typing, network_flags, flags", [
    (10, "10.3.0", "weak", 0, ["FP16"]),
    pytest.param(10, "10.13.0", "strong", 1 << 1, [], marks=needs_converter),  # bit 1
    pytest.param(11, "11.4.0", "strong", 0, [], marks=needs_converter),  # always strong
])
def test_fp16_builds_on_each_path(demo_files, tmp_path, generation, version, typing,  # noqa: PLR0917
                                  network_flags, flags):
    eng, trt = engine(generation, version)
    art = eng.prepare(demo_files["mlp"], FP16, tmp_path)
    (build,) = trt.builds
    assert (build["typing"], build["network_flags"], build["flags"]) == (
        typing, network_flags, flags)
    converted = typing == "strong"
    assert build["graph_types"] == (["float16"] if converted else ["float32"])
    sidecar = json.loads(meta_path(art.path).read_text())
    assert sidecar["precision_path"] == {
        "trt_major": generation, "typing": typing,
        "converter": "onnxconverter-common 1.16.0" if converted else None}
    graphs = list(tmp_path.glob("*.onnx"))
    assert [g.name for g in graphs] == ([sidecar["graph"]] if converted else [])
    session = eng.load(art, FP16, RuntimeOptions())
    assert [(s.name, s.dtype) for s in (*session.inputs, *session.outputs)] == [
        ("features", "float32"), ("probs", "float32")]  # fp32 inputs and outputs kept
    session.close()


@needs_converter
def test_the_converted_graph_is_cached_with_the_converter_named(demo_files, tmp_path):
    eng, trt = engine(11)
    first = eng.prepare(demo_files["cnn"], FP16, tmp_path)
    (graph,) = tmp_path.glob("*.onnx")
    side = json.loads(meta_path(graph).read_text())
    assert side["converter"] == "onnxconverter-common 1.16.0"
    model = onnx.load(str(graph))
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    mtime = graph.stat().st_mtime_ns
    # another batch range: a new plan, the same converted graph (not converted again)
    other = BuildOptions(precision="fp16", max_batch_size=8, opt_batch_size=4)
    second = eng.prepare(demo_files["cnn"], other, tmp_path)
    assert second.cache_key != first.cache_key and len(trt.builds) == 2
    assert graph.stat().st_mtime_ns == mtime and len(list(tmp_path.glob("*.onnx"))) == 1
    # the key names the converter and its version
    path = eng.precision_path(FP16)
    newer = path.with_converter("onnxconverter-common 1.17.0")
    assert eng.key_for(first.source_sha256, FP16, newer) != first.cache_key
    assert eng.key_for(first.source_sha256, FP16, path) == first.cache_key


@needs_converter
def test_a_converted_model_passes_the_release_samples_within_the_fp16_tolerance(
        demo_files, tmp_path):
    """The updater's validation (updater/validation.py) of a strongly typed fp16 plan:
    within the fp16 tolerance, and only because it is widened for fp16."""
    from updater.errors import ReleaseError
    from updater.validation import compare, random_inputs, tolerances

    eng, _trt = engine(11)
    art = eng.prepare(demo_files["cnn"], FP16, tmp_path)
    session = eng.load(art, FP16, RuntimeOptions())
    inputs = {"image": sample_inputs("cnn", batch=2, seed=5)["image"]}
    expected = run_reference(demo_files["cnn"], inputs)  # what a release's samples hold
    got = session.run(inputs)
    session.close()
    compare(got, expected, *tolerances(0.0, 0.0, "tensorrt", "fp16"), "release cnn 1")
    assert not np.array_equal(got["probs"], expected["probs"])  # it did run in fp16
    with pytest.raises(ReleaseError, match="differs from the expected values"):
        compare(got, expected, *tolerances(1e-7, 1e-9, "onnxruntime", "fp32"), "cnn")
    assert random_inputs(session.inputs)["image"].dtype == np.float32


# -- what is refused ------------------------------------------------------------------------


@needs_converter
@pytest.mark.parametrize("maker, words", [
    (big_constant_model, "'big' holds 1e+05"),
    (overflowing_model, "'b' from node 'scale_up_again' (Mul) reaches"),
])
def test_an_fp16_conversion_that_breaks_the_model_is_refused_and_fp32_offered(
        tmp_path, maker, words):
    model = maker(tmp_path / "model.onnx")
    eng, trt = engine(11)
    with pytest.raises(ConversionRefused) as info:
        eng.prepare(model, FP16, tmp_path / "cache")
    text = str(info.value)
    assert words in text and "65504" in text and str(model) in text
    assert "precision = \"fp32\"" in text and info.value.fallback == "fp32"
    assert trt.builds == [] and not list((tmp_path / "cache").glob("*.plan"))
    assert not list((tmp_path / "cache").glob("*.onnx"))  # nothing half-made is kept
    # the fallback builds, and gives the model's own numbers
    fp32 = BuildOptions(precision="fp32", max_batch_size=4)
    session = eng.load(eng.prepare(model, fp32, tmp_path / "cache"), fp32, RuntimeOptions())
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(session.run({"x": x})["y"], run_reference(model, {"x": x})["y"])
    session.close()


def test_weak_typing_builds_fp16_without_converting(tmp_path):
    """Before 10.12 TensorRT picks layer precisions itself (it keeps overflowing layers in
    fp32 when it must), so outpost neither converts nor checks the graph there."""
    model = overflowing_model(tmp_path / "model.onnx")
    eng, trt = engine(10)
    eng.prepare(model, FP16, tmp_path / "cache")
    assert trt.builds[0]["flags"] == ["FP16"] and trt.builds[0]["graph_types"] == ["float32"]


def test_an_output_that_turns_inf_in_onnx_runtime_is_refused(tmp_path):
    """The last check, on the converted graph's outputs (here a graph made to break)."""
    from onnx import TensorProto, helper, numpy_helper

    from engines.tensorrt.fp16_check import check_converted

    def model(op, const):
        graph = helper.make_graph(
            [helper.make_node(op, ["x", "c"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
            initializer=[numpy_helper.from_array(np.float32(const), "c")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    check_converted(model("Mul", 1.0), model("Mul", 1.001), FP16, tmp_path / "m.onnx")
    with pytest.raises(ConversionRefused, match="breaks output 'y': 4 of its 4 values"):
        check_converted(model("Add", 0.0), model("Div", 0.0), FP16, tmp_path / "m.onnx")
    with pytest.raises(ConversionRefused, match="changes output 'y' by up to"):
        check_converted(model("Mul", 1.0), model("Mul", 2.0), FP16, tmp_path / "m.onnx")


class _NotInstalled(importlib.abc.MetaPathFinder):
    """An import hook under which onnxconverter-common is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxconverter_common":
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)


@pytest.fixture
def no_converter(monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "onnxconverter_common"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(), *sys.meta_path])


def test_a_missing_converter_is_one_clear_error_naming_the_package(demo_files, tmp_path,
                                                                     no_converter):
    eng, trt = engine(11)
    with pytest.raises(PrepareError) as info:
        eng.prepare(demo_files["mlp"], FP16, tmp_path)
    text = str(info.value)
    assert "onnxconverter-common, which is not installed" in text
    assert "pip install onnxconverter-common" in text and "precision = \"fp32\"" in text
    assert "TensorRT 11.4.0" in text and trt.events == [] and not list(tmp_path.glob("*.plan"))
    # fp32 needs no converter, nor does weak typing's fp16
    eng.prepare(demo_files["mlp"], BuildOptions(precision="fp32", max_batch_size=4), tmp_path)
    weak, _ = engine(10)
    weak.prepare(demo_files["mlp"], FP16, tmp_path)


def test_bf16_on_a_strongly_typed_build_says_what_to_use(demo_files, tmp_path):
    eng, trt = engine(11)
    with pytest.raises(PrepareError, match="converts to fp16 only: set precision = \"fp16\""):
        eng.prepare(demo_files["mlp"], BuildOptions(precision="bf16", max_batch_size=2),
                    tmp_path)
    weak, trt10 = engine(10)
    weak.prepare(demo_files["mlp"], BuildOptions(precision="bf16", max_batch_size=2), tmp_path)
    assert trt10.builds[0]["flags"] == ["BF16"]


@pytest.mark.parametrize("generation", [10, pytest.param(11, marks=needs_converter)])
def test_qdq_models_build_int8_and_are_refused_under_fp16(tmp_path, generation):
    """The rule: a Q/DQ model's precision is its own. int8 builds it (weakly typed: INT8
    and FP16 flags; strongly typed: as the graph says, no conversion); fp16 or bf16 refuses
    it rather than convert the float graph around its quantization."""
    model = qdq_model(tmp_path / "qdq.onnx")
    eng, trt = engine(generation)
    int8 = BuildOptions(precision="int8", max_batch_size=2)
    session = eng.load(eng.prepare(model, int8, tmp_path / "c"), int8, RuntimeOptions())
    assert trt.builds[0]["flags"] == {10: ["FP16", "INT8"], 11: []}[generation]
    assert trt.builds[0]["graph_types"] == ["float32"]  # not converted
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(session.run({"x": x})["y"], run_reference(model, {"x": x})["y"],
                               rtol=1e-6)
    session.close()
    # (bf16 on a strongly typed build is refused before: the converter makes fp16 only)
    for precision in ("fp16", "bf16") if generation == 10 else ("fp16",):
        with pytest.raises(PrepareError) as info:
            eng.prepare(model, BuildOptions(precision=precision, max_batch_size=2),
                        tmp_path / "c")
        assert "explicitly quantized" in str(info.value)
        assert "precision is \"int8\"" in str(info.value)
    assert len(trt.builds) == 1


# -- the cache keeps the generations apart --------------------------------------------------


@needs_converter
def test_a_plan_of_the_other_generation_is_rebuilt_never_served(demo_files, tmp_path):
    cuda = StandinCuda()
    old_trt = make_trt(cuda, generation=10)
    old = TensorRTEngine(trt=old_trt, cuda=cuda).prepare(demo_files["mlp"], FP16, tmp_path)
    new_trt = make_trt(cuda, generation=11)
    new_engine = TensorRTEngine(trt=new_trt, cuda=cuda)
    new = new_engine.prepare(demo_files["mlp"], FP16, tmp_path)
    assert new.cache_key != old.cache_key and len(new_trt.builds) == 1
    # the 10.x plan put under the 11.x key, sidecar and all: the sidecar disowns it
    new.path.write_bytes(old.path.read_bytes())
    meta_path(new.path).write_bytes(meta_path(old.path).read_bytes())
    new_engine.prepare(demo_files["mlp"], FP16, tmp_path)
    assert len(new_trt.builds) == 2
    # ...and with a sidecar forged to agree, TensorRT 11 itself refuses to deserialize it
    sidecar = json.loads(meta_path(new.path).read_text())
    new.path.write_bytes(old.path.read_bytes())
    sidecar["sha256"] = hashlib.sha256(old.path.read_bytes()).hexdigest()
    meta_path(new.path).write_text(json.dumps(sidecar))
    fresh = TensorRTEngine(trt=new_trt, cuda=cuda)
    served = fresh.prepare(demo_files["mlp"], FP16, tmp_path)
    assert len(new_trt.builds) == 3
    assert json.loads(served.path.read_bytes()[len(b"STANDIN-TRT-PLAN\n"):])["version"] == \
        "11.4.0"
    assert json.loads(meta_path(served.path).read_text())["precision_path"]["trt_major"] == 11


# -- what the commands say ------------------------------------------------------------------


def _compile(tmp_path, model, *extra):
    from appliance.cli.main import main

    return main(["compile", str(model), "--profile", "jetson-orin-nano-8gb", "-o",
                 str(tmp_path / "out.plan"), "--data-dir", str(tmp_path / "data"),
                 "--no-progress", *extra])


@pytest.fixture
def stand_in_compile(monkeypatch):
    from appliance.cli import compile_cmd

    def use(generation):
        eng, trt = engine(generation)
        monkeypatch.setattr(compile_cmd, "_tensorrt_here", lambda: eng)
        return trt
    return use


@needs_converter
def test_compile_offers_fp32_when_the_conversion_is_refused(tmp_path, stand_in_compile,
                                                            capsys):
    model = overflowing_model(tmp_path / "model.onnx")
    trt = stand_in_compile(11)
    assert _compile(tmp_path, model) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "overflows" in err and "add --precision fp32" in err
    assert not (tmp_path / "out.plan").exists()
    assert _compile(tmp_path, model, "--precision", "fp32") == 0
    out = capsys.readouterr().out
    assert "precision fp32: strongly typed network, precision as the graph has it, " \
           "TensorRT 11.4.0" in out
    assert trt.builds[-1]["graph_types"] == ["float32"]


@needs_converter
def test_compile_says_which_path_and_why(tmp_path, demo_files, stand_in_compile, capsys):
    stand_in_compile(11)
    assert _compile(tmp_path, demo_files["mlp"]) == 0
    out = capsys.readouterr().out
    assert ("precision fp16: strongly typed network, graph converted to fp16 by "
            "onnxconverter-common 1.16.0 (fp32 inputs and outputs kept), TensorRT 11.4.0; "
            "TensorRT 11 removed the precision builder flags") in out
    stand_in_compile(10)
    assert _compile(tmp_path, demo_files["mlp"]) == 0
    out = capsys.readouterr().out
    assert ("precision fp16: weakly typed network, builder flags FP16, TensorRT 10.3.0; "
            "TensorRT before 10.12 chooses layer precisions itself") in out


@pytest.mark.parametrize("generation, words", [
    (10, "precision: fp16: weakly typed network, builder flags FP16, TensorRT 10.3.0"),
    pytest.param(11, "precision: fp16: strongly typed network, graph converted to fp16 by "
                     "onnxconverter-common 1.16.0", marks=needs_converter),
])
def test_info_says_how_the_profiles_precision_is_built(tmp_path, monkeypatch, capsys,  # noqa: PLR0917
                                                        generation, words):
    from appliance.cli.main import main
    from appliance.config import profiles

    eng, _trt = engine(generation)
    monkeypatch.setattr(profiles, "choose_engine", lambda *_: (eng, "stand-in TensorRT"))
    assert main(["info", "--profile", "jetson-orin-nano-8gb", "--data-dir",
                 str(tmp_path)]) == 0
    assert words in capsys.readouterr().out


def test_info_says_when_the_converter_is_missing(tmp_path, monkeypatch, capsys, no_converter):
    from appliance.cli.main import main
    from appliance.config import profiles

    eng, _trt = engine(11)
    monkeypatch.setattr(profiles, "choose_engine", lambda *_: (eng, "stand-in TensorRT"))
    assert main(["info", "--profile", "jetson-orin-nano-8gb", "--data-dir",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "precision: fp16: cannot be built here:" in out
    assert "pip install onnxconverter-common" in out


def test_a_typing_mode_can_be_forced_where_the_version_has_both():
    assert precision_path("10.13.0", "fp16", "weak").builder_flags == ("FP16",)
    assert precision_path("10.3.0", "fp16", "strong").network_flags == ("STRONGLY_TYPED",)
    with pytest.raises(PrepareError, match="strongly typed networks only"):
        precision_path("11.4.0", "fp16", "weak")


@needs_converter
@pytest.mark.parametrize("generation, version, modes", [
    (10, "10.13.0", ["strong", "weak"]),  # both: 10.12+ still has the precision flags
    (11, "11.4.0", ["strong"]),
])
def test_gpu_check_runs_each_typing_mode_the_tensorrt_allows(tmp_path, generation, version,  # noqa: PLR0917
                                                             modes):
    import importlib.util
    import io
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent.parent
    spec = importlib.util.spec_from_file_location("gpu_check", root / "build" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    cuda = StandinCuda()
    trt = make_trt(cuda, generation=generation, version=version)
    out = io.StringIO()
    assert check.main(["--batch", "2", "--keep", str(tmp_path)], load_cuda=lambda _b: cuda,
                      load_trt=lambda: trt, out=out) == 0, out.getvalue()
    (row,) = [line for line in out.getvalue().splitlines() if " demo-cnn " in line]
    assert row.startswith("RAN")
    assert [b["typing"] for b in trt.builds] == modes
    assert (f"fp16 strongly typed (graph converted by onnxconverter-common 1.16.0) on "
            f"TensorRT {version}") in row
    assert ("fp16 weakly typed (flags FP16)" in row) == ("weak" in modes)
