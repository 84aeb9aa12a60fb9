"""The TensorRT engine's build and runtime orchestration, against the stand-ins of
tests/support/trt_standin.py, once per API generation: 10.x as JetPack 6 has it (10.3,
weakly typed, precision flags) and 11.x (strongly typed, the graph converted to fp16).
ONNX Runtime computes the outputs from the graph each plan was built from."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from appliance.demo.models import sample_inputs
from engines import BuildOptions, RuntimeOptions, ShapeRange
from engines.errors import EngineUnavailable, ModelInvalid, PrepareError, RunError
from engines.tensorrt import TensorRTEngine, probe
from tests.support.trt_models import needs_converter
from tests.support.trt_standin import StandinCuda, make_trt


@pytest.fixture
def cuda():
    return StandinCuda()


@pytest.fixture(params=[10, pytest.param(11, marks=needs_converter)],
                ids=["trt10.3-weak", "trt11.4-strong"])
def generation(request):
    return request.param


@pytest.fixture
def trt(cuda, generation):
    return make_trt(cuda, generation=generation)


def reference(model_path, feeds):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def plan_reference(eng, feeds):
    """What the graph the plan was built from (converted, on a strongly typed fp16 build)
    gives for ``feeds``: the session must return exactly that."""
    (engine_obj,) = eng._engines.values()
    sess = ort.InferenceSession(engine_obj.onnx, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


FP16_FLAGS = {10: ["FP16"], 11: []}  # weak typing sets the flag; strong typing converts


def engine(trt, cuda, **kw):
    return TensorRTEngine(trt=trt, cuda=cuda, **kw)


OPTS = BuildOptions(precision="fp16", workspace_bytes=256 << 20, max_batch_size=4,
                    opt_batch_size=2)


def test_cnn_builds_loads_and_matches_onnxruntime(trt, cuda, demo_files, tmp_path):
    eng = engine(trt, cuda)
    art = eng.prepare(demo_files["cnn"], OPTS, tmp_path)
    assert art.kind == "tensorrt" and art.path.suffix == ".plan" and art.path.exists()
    session = eng.load(art, OPTS, RuntimeOptions())
    assert [s.as_dict() for s in session.inputs] == [
        {"name": "image", "dtype": "float32", "shape": [-1, 3, 224, 224]}]
    assert session.outputs[0].name == "probs" and session.max_batch_size == 4
    assert session.outputs[0].dtype == "float32"  # fp32 outputs kept by the conversion
    feeds = sample_inputs("cnn", batch=3)
    out = session.run(feeds)
    np.testing.assert_allclose(out["probs"], plan_reference(eng, feeds)["probs"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["probs"], reference(demo_files["cnn"], feeds)["probs"],
                               rtol=1e-2, atol=1e-3)
    session.close()


def test_builder_config_follows_the_options(trt, cuda, demo_files, tmp_path, generation):
    opts = BuildOptions(precision="fp16", workspace_bytes=123 << 20, optimization_level=5,
                        max_batch_size=8, opt_batch_size=4, version_compatible=True)
    engine(trt, cuda).prepare(demo_files["mlp"], opts, tmp_path)
    (build,) = trt.builds
    assert build["workspace"] == 123 << 20
    assert build["opt_level"] == 5
    assert build["flags"] == sorted([*FP16_FLAGS[generation], "VERSION_COMPATIBLE"])
    assert build["typing"] == {10: "weak", 11: "strong"}[generation]
    assert build["graph_types"] == {10: ["float32"], 11: ["float16"]}[generation]
    assert build["device_type"] == "GPU"
    # one profile: batch 1..max, opt at the typical batch
    assert build["num_profiles"] == 1
    assert build["shapes"] == {"features": [[1, 32], [4, 32], [8, 32]]}


def test_dla_core_with_gpu_fallback(cuda, demo_files, tmp_path, generation):
    trt = make_trt(cuda, generation=generation, dla_cores=2)
    opts = BuildOptions(precision="fp16", dla_core=1, gpu_fallback=True, max_batch_size=2)
    engine(trt, cuda).prepare(demo_files["mlp"], opts, tmp_path)
    build = trt.builds[0]
    assert build["device_type"] == "DLA" and build["dla_core"] == 1
    assert "GPU_FALLBACK" in build["flags"]


@pytest.mark.parametrize("opts, words", [
    (BuildOptions(precision="fp16", dla_core=0, max_batch_size=2), "has 0"),
    (BuildOptions(precision="int8", max_batch_size=2), "QuantizeLinear"),
    (BuildOptions(precision="fp64", max_batch_size=2), "use one of fp32"),
])
def test_options_the_device_or_model_cannot_honour(trt, cuda, demo_files, tmp_path, opts,  # noqa: PLR0917
                                                    words):
    with pytest.raises(PrepareError, match=words):
        engine(trt, cuda).prepare(demo_files["mlp"], opts, tmp_path)
    assert not list(tmp_path.glob("*.plan"))


def test_unsupported_op_names_node_and_op(cuda, tmp_path, generation):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu_1"),
         helper.make_node("NonZeroX", ["r"], ["y"], name="odd_one", domain="")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelInvalid) as info:
        engine(make_trt(cuda, generation=generation), cuda).prepare(
            path, BuildOptions(precision="fp16"), tmp_path / "cache")
    text = str(info.value)
    assert "node 'odd_one' (NonZeroX)" in text and str(path) in text  # the user's file
    assert "another opset" in text and "onnxruntime" in text


def test_build_failure_quotes_tensorrt_and_says_what_to_try(cuda, demo_files, tmp_path,
                                                           generation):
    trt = make_trt(cuda, generation=generation,
                   fail_build="[optimizer.cpp::computeCosts] Error Code 10: Internal "
                              "Error (Could not find any implementation for node conv0.)")
    with pytest.raises(PrepareError) as info:
        engine(trt, cuda).prepare(demo_files["cnn"], OPTS, tmp_path)
    text = str(info.value)
    assert "Could not find any implementation for node conv0" in text
    assert "larger workspace" in text and "256 MiB" in text
    assert "precision = \"fp32\"" in text and str(demo_files["cnn"]) in text
    assert {10: "weakly typed", 11: "strongly typed"}[generation] in text
    assert not list(tmp_path.glob("*.plan"))


def test_dynamic_dims_need_a_range_and_get_their_own_profile_entry(trt, cuda, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "t"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t"])])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    eng = engine(trt, cuda)
    with pytest.raises(PrepareError, match="input 'a' has shape \\[-1, -1\\] with dynamic dim 1"):
        eng.prepare(path, BuildOptions(max_batch_size=4), tmp_path / "c")
    ranges = {n: ShapeRange((1, 2), (2, 8), (4, 16)) for n in ("a", "b")}
    opts = BuildOptions(max_batch_size=4, shape_ranges=ranges)
    art = eng.prepare(path, opts, tmp_path / "c")
    assert trt.builds[-1]["shapes"] == {n: [[1, 2], [2, 8], [4, 16]] for n in ("a", "b")}
    session = eng.load(art, opts, RuntimeOptions())
    a = np.arange(30, dtype=np.float32).reshape(3, 10)
    out = session.run({"a": a, "b": a * 2})
    np.testing.assert_array_equal(out["y"], a * 3)


def test_buffers_sized_from_profile_max_and_reused(trt, cuda, demo_files, tmp_path):
    eng = engine(trt, cuda)
    art = eng.prepare(demo_files["mlp"], OPTS, tmp_path)
    session = eng.load(art, OPTS, RuntimeOptions())
    # features [4, 32] float32 and probs [4, 3] float32 at the profile maximum
    assert sorted(cuda.alloc_sizes) == sorted([4 * 32 * 4, 4 * 3 * 4])
    allocs = dict(cuda.device_allocs)
    ctx = trt_ctx(eng)
    for batch in (4, 1, 3, 1):  # a smaller batch after a larger must not see stale rows
        feeds = sample_inputs("mlp", batch=batch, seed=batch)
        out = session.run(feeds)
        np.testing.assert_allclose(out["probs"], plan_reference(eng, feeds)["probs"],
                                   rtol=1e-6)
    assert cuda.device_allocs == allocs  # nothing allocated per batch
    # set_input_shape for every input on every batch (after the load-time max shape)
    assert [s for n, s in ctx.shape_calls[1:]] == [(4, 32), (1, 32), (3, 32), (1, 32)]
    assert ctx.executions == 4
    session.close()
    assert not cuda.device_allocs and not cuda.pinned_allocs and not cuda.streams


def test_an_instance_counts_its_context_memory_and_io_buffers(trt, cuda, demo_files,
                                                               tmp_path):
    """The memory budget's view of a GPU instance: what RSS does not show."""
    eng = engine(trt, cuda)
    art = eng.prepare(demo_files["mlp"], OPTS, tmp_path)
    session = eng.load(art, OPTS, RuntimeOptions())
    (engine_obj,) = eng._engines.values()
    io = 4 * 32 * 4 + 4 * 3 * 4  # features and probs at the profile maximum
    assert session.device_memory_bytes() == engine_obj.device_memory_size_v2 + io
    session.close()


def trt_ctx(eng):
    (engine_obj,) = eng._engines.values()
    return engine_obj.contexts[-1]


def test_instances_get_their_own_context_and_stream(trt, cuda, demo_files, tmp_path):
    eng = engine(trt, cuda)
    art = eng.prepare(demo_files["identity"], OPTS, tmp_path)
    a, b = eng.load(art, OPTS, RuntimeOptions()), eng.load(art, OPTS, RuntimeOptions())
    (engine_obj,) = eng._engines.values()  # one ICudaEngine, deserialized once
    assert len(engine_obj.contexts) == 2 and len(cuda.streams) == 2
    x = sample_inputs("identity", batch=2)["x"]
    np.testing.assert_array_equal(a.run({"x": x})["y"], x)
    np.testing.assert_array_equal(b.run({"x": x + 1})["y"], x + 1)
    assert [e for e, _ in trt.events].count("deserialize") == 1
    a.close()
    assert eng._engines  # the other instance still uses it
    b.close()
    b.close()  # closing twice is harmless
    assert not eng._engines  # the last close frees the engine's weights


def test_warmup_runs_min_and_opt_shapes(trt, cuda, demo_files, tmp_path):
    eng = engine(trt, cuda)
    session = eng.load(eng.prepare(demo_files["mlp"], OPTS, tmp_path), OPTS, RuntimeOptions())
    session.warmup()
    assert [s for _, s in trt_ctx(eng).shape_calls[1:]] == [(1, 32), (2, 32)]


def test_run_errors_are_surfaced(cuda, demo_files, tmp_path, generation):
    trt = make_trt(cuda, generation=generation)
    eng = engine(trt, cuda)
    session = eng.load(eng.prepare(demo_files["mlp"], OPTS, tmp_path), OPTS, RuntimeOptions())
    with pytest.raises(RunError, match="built for \\[1, 32\\] to \\[4, 32\\]"):
        session.run(sample_inputs("mlp", batch=5))
    with pytest.raises(RunError, match="float64"):
        session.run({"features": np.zeros((1, 32))})
    with pytest.raises(RunError, match="missing"):
        session.run({})
    trt.fail_execute = True
    with pytest.raises(RunError, match="execute_async_v3"):
        session.run(sample_inputs("mlp", batch=1))


def test_no_gpu_means_no_tensorrt_object(demo_files, tmp_path, generation):
    cuda = StandinCuda(gpus=[])
    trt = make_trt(cuda, generation=generation)
    eng = engine(trt, cuda)
    with pytest.raises(EngineUnavailable, match="no CUDA-capable device"):
        eng.prepare(demo_files["mlp"], OPTS, tmp_path)
    assert trt.events == []  # neither a Builder nor a Runtime was made
    ok, reason = probe(trt=trt, cuda=cuda)
    assert not ok and "no usable NVIDIA GPU" in reason and "no CUDA-capable device" in reason
    assert trt.events == []


def test_probe_with_a_gpu(trt, cuda):
    ok, reason = probe(trt=trt, cuda=cuda)
    assert ok and f"TensorRT {trt.__version__}" in reason and "Standin Orin (sm_87" in reason


def test_progress_monitor_reports_and_can_cancel(trt, cuda, demo_files, tmp_path):
    seen = []

    class Bar:
        def __init__(self, cancel_at=None):
            self.cancel_at = cancel_at

        def phase_start(self, phase, parent, steps):
            seen.append(("start", phase, parent, steps))

        def step_complete(self, phase, step):
            seen.append(("step", step))
            return step != self.cancel_at

        def phase_finish(self, phase):
            seen.append(("finish", phase))

    eng = engine(trt, cuda)
    eng.build(demo_files["mlp"], OPTS, progress=Bar())
    assert seen[0] == ("start", "Building engine", None, 4)
    assert seen[-1] == ("finish", "Building engine") and ("step", 3) in seen
    seen.clear()
    with pytest.raises(PrepareError, match="cancelled"):
        eng.build(demo_files["mlp"], OPTS, progress=Bar(cancel_at=1))


def test_timing_cache_is_kept_per_device(trt, cuda, demo_files, tmp_path):
    eng = engine(trt, cuda)
    eng.prepare(demo_files["mlp"], OPTS, tmp_path)
    (timing,) = tmp_path.glob("timing-*.cache")
    assert timing.name == f"timing-standin-orin-sm_87-trt{trt.__version__}.cache"
    assert json.loads(timing.read_bytes())["entries"] == 1
    eng.prepare(demo_files["identity"], OPTS, tmp_path)  # another model reuses it
    assert [d for e, d in trt.events if e == "timing_cache_loaded"] == [0, 1]
    assert json.loads(timing.read_bytes())["entries"] == 2


def test_restart_does_not_rebuild(trt, cuda, demo_files, tmp_path):
    first = engine(trt, cuda).prepare(demo_files["mlp"], OPTS, tmp_path)
    again = engine(trt, cuda).prepare(demo_files["mlp"], OPTS, tmp_path)  # a new process
    assert again.path == first.path and len(trt.builds) == 1


def test_plan_that_does_not_deserialize_is_rebuilt_not_served(trt, cuda, demo_files,
                                                              tmp_path):
    from engines.cache import meta_path

    art = engine(trt, cuda).prepare(demo_files["mlp"], OPTS, tmp_path)
    # Garbage whose sidecar agrees (as if the plan were written by a broken TensorRT):
    # only deserialization can tell.
    sidecar = json.loads(meta_path(art.path).read_text())
    art.path.write_bytes(b"not a plan")
    import hashlib

    sidecar["sha256"] = hashlib.sha256(b"not a plan").hexdigest()
    meta_path(art.path).write_text(json.dumps(sidecar))
    eng = engine(trt, cuda)
    again = eng.prepare(demo_files["mlp"], OPTS, tmp_path)
    assert len(trt.builds) == 2 and again.path == art.path
    session = eng.load(again, OPTS, RuntimeOptions())
    feeds = sample_inputs("mlp", batch=2)
    np.testing.assert_allclose(session.run(feeds)["probs"],
                               plan_reference(eng, feeds)["probs"], rtol=1e-6)


def test_plan_built_on_another_gpu_is_rebuilt(demo_files, tmp_path, generation):
    from engines.tensorrt.cuda import GpuInfo

    orin = StandinCuda()
    art = engine(make_trt(orin, generation=generation), orin).prepare(
        demo_files["mlp"], OPTS, tmp_path)
    other = StandinCuda([GpuInfo(0, "Standin Xavier", (7, 2), 8 << 30)])
    trt2 = make_trt(other, generation=generation)
    again = engine(trt2, other).prepare(demo_files["mlp"], OPTS, tmp_path)
    assert again.cache_key != art.cache_key and len(trt2.builds) == 1
    # the Orin plan copied under the Xavier's key: its sidecar names another GPU
    from engines.cache import meta_path

    again.path.write_bytes(art.path.read_bytes())
    meta_path(again.path).write_bytes(meta_path(art.path).read_bytes())
    engine(trt2, other).prepare(demo_files["mlp"], OPTS, tmp_path)
    assert len(trt2.builds) == 2


# -- the CLI over the stand-in ------------------------------------------------------------


def test_compile_writes_a_plan_with_the_profile_settings(trt, cuda, demo_files, tmp_path,  # noqa: PLR0917
                                                         capsys, generation):
    from appliance.cli.compile_cmd import compile_model
    from appliance.cli.main import build_parser

    out = tmp_path / "mlp.plan"
    args = build_parser().parse_args([
        "compile", str(demo_files["mlp"]), "--profile", "jetson-orin-nx-16gb", "-o", str(out),
        "--data-dir", str(tmp_path / "data"), "--no-progress"])
    assert compile_model(args, engine=engine(trt, cuda)) == 0
    assert out.read_bytes().startswith(b"STANDIN-TRT-PLAN")
    (build,) = trt.builds
    assert build["workspace"] == 1024 << 20 and build["flags"] == FP16_FLAGS[generation]
    assert build["shapes"]["features"][2] == [16, 32]  # the profile's max_batch_size
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "profile jetson-orin-nx-16gb" in printed
    assert {10: "weakly typed network, builder flags FP16, TensorRT 10.3.0",
            11: "strongly typed network, graph converted to fp16 by onnxconverter-common"
            }[generation] in printed
    assert list((tmp_path / "data" / "engines").glob("timing-*.cache"))


def test_compile_without_tensorrt_says_where_to_build(demo_files, tmp_path):
    import subprocess
    import sys

    from engines.tensorrt import probe

    if probe()[0]:
        pytest.skip("TensorRT is usable here")
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "compile", str(demo_files["mlp"]), "--profile",
         "jetson-orin-nano-8gb", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    assert "TensorRT can't build on this host" in proc.stderr
    assert "on the target device" in proc.stderr and "Traceback" not in proc.stderr


def test_models_add_reports_an_unbuildable_model_and_keeps_nothing(cuda, demo_files, tmp_path,  # noqa: PLR0917
                                                                   monkeypatch, capsys,
                                                                   generation):
    from appliance.cli.main import main
    from appliance.config import profiles
    from appliance.models.repository import Repository

    trt = make_trt(cuda, generation=generation,
                   unsupported_ops=("Softmax",))  # as if this TensorRT lacked it
    monkeypatch.setattr(profiles, "choose_engine",
                        lambda *_: (engine(trt, cuda), "stand-in TensorRT"))
    data = tmp_path / "data"
    code = main(["models", "add", "mlp", str(demo_files["mlp"]), "--data-dir", str(data),
                 "--appliance-config", str(_config(tmp_path, "jetson-orin-nano-8gb"))])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "model 'mlp' was not added" in err
    assert "(Softmax)" in err and "another opset" in err
    repo = Repository(data)
    assert repo.models() == [] and not list((data / "models").iterdir())
    repo.close()


def test_models_add_builds_the_engine_for_the_profile(trt, cuda, demo_files, tmp_path,  # noqa: PLR0917
                                                      monkeypatch, capsys):
    from appliance.cli.main import main
    from appliance.config import profiles

    monkeypatch.setattr(profiles, "choose_engine",
                        lambda *_: (engine(trt, cuda), "stand-in TensorRT"))
    data = tmp_path / "data"
    code = main(["models", "add", "mlp", str(demo_files["mlp"]), "--data-dir", str(data),
                 "--appliance-config", str(_config(tmp_path, "jetson-orin-nano-8gb"))])
    assert code == 0, capsys.readouterr().err
    assert "tensorrt engine for profile jetson-orin-nano-8gb" in capsys.readouterr().out
    (build,) = trt.builds
    assert build["workspace"] == 512 << 20 and build["shapes"]["features"][2] == [8, 32]
    assert len(list((data / "engines").glob("*.plan"))) == 1


def _config(tmp_path, profile):
    path = tmp_path / "outpost.toml"
    path.write_text(f"profile = \"{profile}\"\n")
    return path


def test_a_refused_optimisation_profile_is_an_error(trt, cuda, demo_files, tmp_path):
    ranges = {"features": ShapeRange((4, 32), (2, 32), (8, 32))}  # min > opt
    with pytest.raises(PrepareError, match="refused the optimisation profile"):
        engine(trt, cuda).prepare(demo_files["mlp"],
                                  BuildOptions(max_batch_size=8, shape_ranges=ranges), tmp_path)


def test_progress_bar_draws_nested_phases_and_cancels():
    import io

    from appliance.cli.progress import BuildProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = BuildProgressBar(out=tty, width=10)
    bar.phase_start("Building engine", None, 4)
    bar.phase_start("Tactic selection", "Building engine", 20)
    bar.step_complete("Tactic selection", 9)
    bar.phase_finish("Tactic selection")
    bar.step_complete("Building engine", 1)
    assert "Building engine > Tactic selection 10/20" in tty.getvalue()
    assert "[#####.....]  50% Building engine" in tty.getvalue()
    bar.cancelled = True
    assert bar.step_complete("Building engine", 2) is False  # TensorRT then stops the build
    plain = io.StringIO()
    bar = BuildProgressBar(out=plain)
    bar.phase_start("Building engine", None, 4)
    bar.phase_start("Inner", "Building engine", 2)
    bar.phase_finish("Inner")
    bar.phase_finish("Building engine")
    lines = plain.getvalue().splitlines()
    assert lines[0] == "build: Building engine (4 steps)"
    assert lines[1].startswith("build: Building engine done after") and len(lines) == 2


def test_dims_fixed_in_config_toml_close_the_graphs_open_dims(trt, cuda, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from appliance.config.schema import BatchingConfig
    from appliance.models.loaded import build_options
    from appliance.models.model_config import complete, load_model_config

    graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "t"])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    toml = tmp_path / "config.toml"
    toml.write_text("max_batch_size = 4\n[[input]]\nname = \"a\"\ndims = [16]\n")
    config = complete(load_model_config(toml), path, BatchingConfig(), str(toml))
    opts = build_options(config)
    eng = engine(trt, cuda)
    session = eng.load(eng.prepare(path, opts, tmp_path / "c"), opts, RuntimeOptions())
    assert trt.builds[-1]["shapes"] == {"a": [[1, 16], [2, 16], [4, 16]]}
    a = np.linspace(-1, 1, 48, dtype=np.float32).reshape(3, 16)
    np.testing.assert_array_equal(session.run({"a": a})["y"], np.maximum(a, 0))


def test_layout_measuring_runs_through_the_tensorrt_session_off_its_thread(
        trt, cuda, demo_files, tmp_path):
    """The layout is measured from a worker thread, as a load does: every batch size up to
    the profile's maximum goes through set_input_shape and the session's own context, and
    TensorRT has no intra-op threads to measure."""
    import threading

    from appliance.scheduling.tuning import Want, read_cached, resolve_layout

    eng = engine(trt, cuda)
    artifact = eng.prepare(demo_files["mlp"], OPTS, tmp_path)
    sessions, contexts = [], []

    def make_session(threads, spinning):
        assert (threads, spinning) == (1, False)
        sessions.append(eng.load(artifact, OPTS, RuntimeOptions()))
        contexts.append(trt_ctx(eng))
        return sessions[-1]

    want = Want(cores=4, max_batch_size=OPTS.max_batch_size, threads=1, instances=1,
                spinning=False, thread_counts=False)
    path = tmp_path / "layout.json"
    got: list = []
    worker = threading.Thread(target=lambda: got.append(resolve_layout(make_session, want,
                                                                       path)))
    worker.start()
    worker.join(60)
    assert got and got[0].preferred_batch in (1, 2, 4) and got[0].threads == 1
    shapes = {s for _, s in contexts[0].shape_calls[1:]}
    assert shapes == {(1, 32), (2, 32), (4, 32)}
    assert read_cached(path).preferred_batch == got[0].preferred_batch
    assert len(sessions) == 1  # measured on one session, closed afterwards
