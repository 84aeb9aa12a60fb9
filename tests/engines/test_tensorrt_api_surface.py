"""The TensorRT stand-in and the engine, held against the real TensorRT APIs.

- Runtime: the real 11.4 lean runtime (``tensorrt-lean-cu13``, imported; no GPU is used)
  has every runtime class, method, property and enum member (with its value) that the
  stand-in offers and the engine looks up.
- Builder: the real 10.13 and 11.4 bindings (their wheels, read without loading:
  tests/support/trt_wheels.py) name everything the engine looks up on the stand-in of that
  generation, and everything the stand-in offers; and the stand-in lacks what the real
  generation lacks (11.x: BuilderFlag.FP16/BF16/INT8, EXPLICIT_BATCH).

What the engine looks up is recorded while it runs its paths on the stand-in: fp32, fp16
(weakly and strongly typed), int8 from Q/DQ, DLA with GPU fallback, version-compatible
plans, progress and cancel, the timing cache, a parser refusal, a failed build, and loading,
running and warming up a session.
"""

from __future__ import annotations

import enum

import pytest

from appliance.demo.models import sample_inputs
from engines import BuildOptions, RuntimeOptions
from engines.errors import EngineError
from engines.tensorrt import TensorRTEngine, probe
from engines.tensorrt.precision import precision_path
from tests.support import trt_wheels
from tests.support.trt_models import CONVERTER_INSTALLED, qdq_model
from tests.support.trt_standin import TEST_HOOKS, StandinCuda, make_trt, record_engine_use

BUILDER_SIDE = frozenset({"Builder", "OnnxParser", "IBuilderConfig", "INetworkDefinition",
                          "ITensor", "ParserError", "NetworkDefinitionCreationFlag"})
# the precision flags 11.0 removed, and the docstring each has where it exists
PRECISION_FLAG_DOCS = {"FP16": "Enable FP16 layer selection.",
                       "BF16": "Enable BF16 layer selection.",
                       "INT8": "Enable Int8 layer selection."}


class Bar:
    def __init__(self, cancel_at=None):
        self.cancel_at = cancel_at

    def phase_start(self, phase, parent, steps):
        pass

    def step_complete(self, phase, step):
        return step != self.cancel_at

    def phase_finish(self, phase):
        pass


def _engine_paths(generation: int, version: str, models: dict, tmp) -> None:
    """Run the engine through its paths on one stand-in."""
    cuda = StandinCuda()
    trt = make_trt(cuda, generation=generation, version=version, dla_cores=1,
                   unsupported_ops=("Softmax",))
    eng = TensorRTEngine(trt=trt, cuda=cuda)
    probe(trt=trt, cuda=cuda)
    # (without the converter a strongly typed build takes the same TensorRT names in fp32)
    opts = BuildOptions(precision="fp16" if CONVERTER_INSTALLED else "fp32", max_batch_size=4,
                        opt_batch_size=2, version_compatible=True)
    session = eng.load(eng.prepare(models["identity"], opts, tmp / "c"), opts, RuntimeOptions())
    session.warmup()
    session.run(sample_inputs("identity", batch=3))
    session.close()
    for opts, model in [
            (BuildOptions(precision="fp32", max_batch_size=2), models["identity"]),
            (BuildOptions(precision="int8", max_batch_size=2), models["qdq"]),
            (BuildOptions(precision="int8", max_batch_size=2, dla_core=0), models["qdq"]),
            (BuildOptions(precision="fp16", max_batch_size=2), models["mlp"])]:  # refused
        try:
            eng.build(model, opts, timing_cache=tmp / "timing.cache", progress=Bar(),
                      cache_dir=tmp / "c")
        except EngineError:
            pass
    with pytest.raises(EngineError, match="cancelled"):
        eng.build(models["identity"], BuildOptions(max_batch_size=2), progress=Bar(1))
    trt.fail_build = "Could not find any implementation"
    with pytest.raises(EngineError, match="Could not find"):
        eng.build(models["identity"], BuildOptions(max_batch_size=2))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from appliance.demo.models import identity_model, mlp_model

    folder = tmp_path_factory.mktemp("api-models")
    return {"identity": identity_model(folder / "identity.onnx"),
            "mlp": mlp_model(folder / "mlp.onnx"), "qdq": qdq_model(folder / "qdq.onnx")}


@pytest.fixture(scope="module")
def engine_use(models, tmp_path_factory):
    """generation -> the (owner, name) pairs the engine looked up on its stand-in: 10.x at
    10.3 (weakly typed) and 10.13 (strongly typed by flag), 11.x at 11.4."""
    used = {}
    for generation, versions in {10: ("10.3.0", "10.13.0"), 11: ("11.4.0",)}.items():
        with record_engine_use() as seen:
            for version in versions:
                _engine_paths(generation, version, models,
                              tmp_path_factory.mktemp(f"api-{version}"))
        used[generation] = set(seen)
    return used


def _surface(trt) -> set[tuple[str, str]]:
    """(owner, name) of everything the stand-in offers as TensorRT's API."""
    names = set()
    for attr, value in vars(trt).items():
        if attr.startswith("_") or attr in TEST_HOOKS:
            continue
        names.add(("tensorrt", attr))
        names |= _class_surface(attr, value)
    names |= _class_surface("Severity", trt.ILogger.Severity)
    return names


def _class_surface(owner: str, cls) -> set[tuple[str, str]]:
    if isinstance(cls, enum.EnumMeta):
        return {(owner, m) for m in cls.__members__}
    if isinstance(cls, type) and not issubclass(cls, bytes):
        return {(owner, n) for n in vars(cls) if not n.startswith("_")}
    return set()


# -- the runtime: the real lean runtime, imported -------------------------------------------


@pytest.fixture(scope="module")
def lean():
    return pytest.importorskip(
        "tensorrt_lean", reason="the real TensorRT 11 lean runtime is not installed: pip "
                                "install tensorrt-lean-cu13 (the [test] extra brings it)")


def _lean_owner(lean, owner: str):
    if owner == "tensorrt":
        return lean
    if owner == "Severity":
        return lean.ILogger.Severity
    return getattr(lean, owner, None)


def test_the_real_lean_runtime_has_every_runtime_name_used(lean, engine_use):
    stand_in = make_trt(StandinCuda(), generation=11)
    checked, missing = set(), []
    for owner, name in sorted(_surface(stand_in) | engine_use[11]):
        if owner in BUILDER_SIDE or (owner == "tensorrt" and name in BUILDER_SIDE):
            continue  # the lean runtime has no builder: checked against the bindings below
        checked.add((owner, name))
        real = _lean_owner(lean, owner)
        if real is None or not hasattr(real, name):
            missing.append(f"{owner}.{name}")
    assert not missing, f"not in TensorRT {lean.__version__}'s lean runtime: {missing}"
    used_runtime = {n for o, n in engine_use[11] if o in ("ICudaEngine", "IExecutionContext")}
    assert {"execute_async_v3", "set_input_shape", "set_tensor_address",
            "get_tensor_profile_shape"} <= used_runtime  # the recording saw the runtime
    assert len(checked) > 50


def test_the_stand_ins_enums_number_members_as_the_real_runtime(lean):
    stand_in = make_trt(StandinCuda(), generation=11)
    for name in ("BuilderFlag", "DataType", "TensorIOMode", "MemoryPoolType", "DeviceType"):
        real = getattr(lean, name)
        for member, value in getattr(stand_in, name).__members__.items():
            assert int(getattr(real, member)) == int(value), f"{name}.{member}"
    for member, value in stand_in.ILogger.Severity.__members__.items():
        assert int(getattr(lean.ILogger.Severity, member)) == int(value)
    assert not {"FP16", "BF16", "INT8"} & set(lean.BuilderFlag.__members__)


# -- the builder: the real bindings' symbol tables -----------------------------------------


@pytest.fixture(scope="module", params=[10, 11], ids=["trt10.13", "trt11.4"])
def real(request):
    try:
        return request.param, trt_wheels.load(request.param)
    except trt_wheels.Unavailable as exc:
        pytest.skip(f"the real TensorRT {request.param} bindings are not cached in "
                    f"{trt_wheels.cache_dir()} and could not be downloaded ({exc}); they "
                    f"are needed once per machine (or set {trt_wheels.CACHE_ENV})")


def test_the_real_bindings_name_everything_the_engine_and_stand_in_use(real, engine_use):
    generation, bindings = real
    stand_in = make_trt(StandinCuda(), generation=generation)
    names = _surface(stand_in) | engine_use[generation]
    missing = sorted(f"{o}.{n}" for o, n in names
                     if not bindings.has(n) or (o != "tensorrt" and not bindings.has(o)))
    assert not missing, f"not in {bindings.package} {bindings.version}: {missing}"
    assert len(names) > 80


def test_the_stand_in_lacks_what_the_real_generation_lacks(real):
    generation, bindings = real
    stand_in = make_trt(StandinCuda(), generation=generation)
    for flag, doc in PRECISION_FLAG_DOCS.items():
        assert hasattr(stand_in.BuilderFlag, flag) == bindings.says(doc), flag
    assert hasattr(stand_in.BuilderFlag, "FP16") == bindings.has("FP16")
    explicit = hasattr(stand_in.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert explicit == bindings.has("EXPLICIT_BATCH")
    assert bindings.has("STRONGLY_TYPED")
    assert {10: True, 11: False}[generation] == explicit


def test_on_11_strong_typing_is_always_on_so_the_engine_passes_no_flag(real):
    generation, bindings = real
    always = bindings.says("Strongly typed mode is always enabled")
    assert always == (generation == 11)
    path = precision_path(bindings.version, "fp16")
    assert path.typing == "strong" and path.builder_flags == ()
    assert path.network_flags == (() if always else ("STRONGLY_TYPED",))
