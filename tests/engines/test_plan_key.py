"""The plan key (engines/tensorrt/plan_key.py): what makes a TensorRT plan valid on a
device, computed alike on the device and from a plan's sidecar; `outpost compile` writes
and prints it, `--key-of` reads it back; a plan adopted into the engine cache is served
without a build, and one for another GPU or TensorRT is refused with nothing cached.
Against the TensorRT stand-in (tests/support/trt_standin.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from appliance.cli.compile_cmd import compile_model
from appliance.cli.main import build_parser
from engines import BuildOptions, ShapeRange
from engines.base import file_sha256
from engines.cache import meta_path, write_meta
from engines.tensorrt import TensorRTEngine
from engines.tensorrt.cuda import GpuInfo
from engines.tensorrt.plan_key import (
    PlanKeyError,
    key_from_custom,
    plan_key,
    read_plan_key,
)
from tests.support.trt_standin import StandinCuda, make_trt

PROFILE = "jetson-orin-nano-8gb"
OPTS = BuildOptions(precision="fp16", workspace_bytes=512 << 20, max_batch_size=8,
                    opt_batch_size=4,
                    shape_ranges={"x": ShapeRange((1, 16), (4, 16), (8, 16))})


def engine(name="Standin Orin", cc=(8, 7), generation=10, version=None):
    cuda = StandinCuda([GpuInfo(0, name, cc, 8 << 30)])
    return TensorRTEngine(trt=make_trt(cuda, generation=generation, version=version),
                          cuda=cuda)


def device_key(eng, options=OPTS, sha="a" * 64):
    return plan_key(eng.plan_meta(sha, options))


def test_the_same_device_and_settings_give_the_same_key():
    assert device_key(engine()).digest == device_key(engine()).digest
    assert device_key(engine(), sha="a" * 64).digest == \
        device_key(engine(), sha="b" * 64).digest  # the model is bound by the signature


@pytest.mark.parametrize("other, said", [
    (lambda: device_key(engine(version="10.4.0")), "TensorRT 10.3.0 vs 10.4.0"),
    (lambda: device_key(engine(name="Standin Xavier", cc=(7, 2))),
     "GPU Standin Orin (sm 8.7) vs Standin Xavier (sm 7.2)"),
    (lambda: device_key(engine(cc=(8, 6))), "(sm 8.7) vs Standin Orin (sm 8.6)"),
    (lambda: device_key(engine(), dataclasses.replace(OPTS, workspace_bytes=1 << 30)),
     "workspace_bytes 536870912 vs 1073741824"),
    (lambda: device_key(engine(), dataclasses.replace(OPTS, precision="fp32")),
     "precision fp16 vs fp32"),
    (lambda: device_key(engine(), dataclasses.replace(OPTS, optimization_level=5)),
     "optimization_level 3 vs 5"),
    (lambda: device_key(engine(), dataclasses.replace(OPTS, max_batch_size=16)),
     "max_batch_size 8 vs 16"),
])
def test_version_gpu_and_each_build_setting_move_the_key_and_are_named(other, said):
    mine, theirs = device_key(engine()), other()
    assert mine.digest != theirs.digest
    assert any(said in d for d in mine.differences(theirs)), mine.differences(theirs)


def test_the_other_generation_moves_the_key_by_its_precision_path():
    ten, eleven = device_key(engine()), device_key(engine(generation=11))
    assert ten.digest != eleven.digest
    assert ten.build["precision_path"]["typing"] == "weak"
    assert eleven.build["precision_path"]["typing"] == "strong"


def test_signed_form_round_trips_and_a_changed_field_is_refused():
    key = device_key(engine())
    custom = json.loads(json.dumps(key.as_custom()))  # as it travels in targets.json
    assert key_from_custom(custom).digest == key.digest
    forged = {**custom, "engine_version": "11.4.0"}  # the digest no longer fits
    with pytest.raises(PlanKeyError, match="does not match its fields"):
        key_from_custom(forged)
    for bad in (None, "abc", {"digest": key.digest}):
        with pytest.raises(PlanKeyError):
            key_from_custom(bad)


# -- `outpost compile` writes and prints it; --key-of reads it back -------------------------


def _compile(eng, model, out, data, capsys, *extra):
    args = build_parser().parse_args(["compile", str(model), "--profile", PROFILE, "-o",
                                      str(out), "--data-dir", str(data), "--no-progress",
                                      *extra])
    assert compile_model(args, engine=eng) == 0
    return capsys.readouterr().out


def test_compile_writes_the_key_beside_the_plan_and_prints_it(demo_files, tmp_path, capsys):
    eng = engine()
    out = tmp_path / "identity.plan"
    printed = _compile(eng, demo_files["identity"], out, tmp_path / "d", capsys)
    key, meta = read_plan_key(out)
    assert meta["source_sha256"] == file_sha256(demo_files["identity"])
    assert meta["sha256"] == file_sha256(out)
    assert f"plan key {key.describe()}" in printed
    assert key.trt_version == "10.3.0" and key.gpu == "Standin Orin"
    assert key.build["precision"] == "fp16" and key.build["workspace_bytes"] == 512 << 20

    args = build_parser().parse_args(["compile", "--key-of", str(out)])
    assert compile_model(args) == 0
    assert capsys.readouterr().out.strip() == f"plan key {key.describe()}"


def test_key_of_a_cached_plan_is_the_devices_key(demo_files, tmp_path, capsys):
    eng = engine()
    art = eng.prepare(demo_files["identity"], OPTS, tmp_path / "cache")
    args = build_parser().parse_args(["compile", "--key-of", str(art.path)])
    assert compile_model(args) == 0
    assert device_key(eng).short in capsys.readouterr().out


@pytest.mark.parametrize("spoil, said", [
    (lambda side: side.unlink(), "is missing"),
    (lambda side: side.write_text("{not json"), "can't be read from"),
    (lambda side: side.write_text("[]"), "not a JSON object"),
    (lambda side: side.write_text(json.dumps({**json.loads(side.read_text()),
                                              "sha256": "0" * 64})), "describes another plan"),
    (lambda side: side.write_text(json.dumps({k: v for k, v in
                                              json.loads(side.read_text()).items()
                                              if k != "device"})), "no 'device'"),
    (lambda side: side.write_text(json.dumps({k: v for k, v in
                                              json.loads(side.read_text()).items()
                                              if k != "source_sha256"})), "source_sha256"),
])
def test_an_unreadable_key_is_one_clear_error(demo_files, tmp_path, capsys, spoil, said):
    out = tmp_path / "identity.plan"
    _compile(engine(), demo_files["identity"], out, tmp_path / "d", capsys)
    spoil(meta_path(out))
    with pytest.raises(PlanKeyError, match=said) as err:
        read_plan_key(out)
    assert str(out) in str(err.value)


# -- adopting a plan built elsewhere into the engine cache --------------------------------


def test_an_adopted_plan_is_served_without_a_build(demo_files, tmp_path):
    model = demo_files["identity"]
    reference = engine()
    plan = tmp_path / "ref.plan"
    plan.write_bytes(reference.build(model, OPTS))
    device = engine()  # the same class of device, another process
    complaint = device.adopt(plan, model, OPTS, tmp_path / "cache", origin="ref")
    assert complaint is None and not plan.exists()  # moved into the cache
    assert device._trt.builds == [] and len(device._trt.deserialized) == 1
    art = device.prepare(model, OPTS, tmp_path / "cache")
    assert device._trt.builds == []
    sidecar = json.loads(meta_path(art.path).read_text())
    assert sidecar["origin"] == "ref" and sidecar["sha256"] == file_sha256(art.path)


def test_a_plan_for_another_gpu_is_refused_and_nothing_is_cached(demo_files, tmp_path):
    model = demo_files["identity"]
    plan = tmp_path / "xavier.plan"
    plan.write_bytes(engine(name="Standin Xavier", cc=(7, 2)).build(model, OPTS))
    device = engine()
    complaint = device.adopt(plan, model, OPTS, tmp_path / "cache", origin="elsewhere")
    assert "could not deserialize it here" in complaint
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_write_meta_is_the_sidecar_the_cache_checks(tmp_path):
    art = tmp_path / "k.plan"
    art.write_bytes(b"plan")
    write_meta(art, {"kind": "tensorrt"}, file_sha256(art), 4)
    assert json.loads(meta_path(art).read_text()) == {"kind": "tensorrt",
                                                      "sha256": file_sha256(art), "bytes": 4}
