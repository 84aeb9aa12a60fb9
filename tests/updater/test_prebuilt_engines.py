"""Prebuilt TensorRT plans per device class, end to end: a reference device compiles the
release's model (`outpost compile`), `outpost fleet attach-engine` signs the plan into the
release, a real fleet server serves it on 127.0.0.1, and a real update agent on a device
takes it instead of building when its plan key matches.

The devices run TensorRT's stand-in (tests/support/trt_standin.py), in this process: it
counts builds (``trt.builds``) and records the sha256 of every blob handed to
``deserialize_cuda_engine`` (``trt.deserialized``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import tomllib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.cli.compile_cmd import compile_model
from appliance.cli.main import build_parser
from appliance.config.profiles import load_profile
from appliance.demo.models import save_model
from appliance.models.repository import Repository
from engines.base import file_sha256
from engines.cache import meta_path
from engines.tensorrt import TensorRTEngine
from engines.tensorrt.cuda import GpuInfo
from tests.support.trt_standin import StandinCuda, make_trt
from tests.support.updater_support import (
    Fleet,
    active_version,
    journal_notes,
    journal_rows,
    make_device,
    run_outpost,
)
from updater.fleet_repo import engine_path
from updater.validation import make_release_samples
from updater.wiring import make_agent

PROFILE = "jetson-orin-nano-8gb"
ORIN = GpuInfo(0, "Standin Orin", (8, 7), 8 << 30)
XAVIER = GpuInfo(0, "Standin Xavier", (8, 7), 8 << 30)  # same sm, another GPU


def scaling_model(path: Path, factor: float = 2.0) -> Path:
    """y = factor * x over [batch, 16]: release 2 doubles (the device holds the demo
    identity as 1); another factor is another model of the same shapes."""
    k = numpy_helper.from_array(np.full((16,), factor, np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[k])
    return save_model(graph, path)


class Device:
    """A device data dir holding identity 1, its real update agent wired to a TensorRT
    stand-in of the given GPU and generation."""

    def __init__(self, folder: Path, fleet: Fleet, v1: Path, gpu: GpuInfo = ORIN,
                 generation: int = 10, device_id: str = "dev-1", installed: bool = True):
        self.data = folder
        self.config = make_device(folder, fleet, v1, device_id=device_id,
                                  installed=installed)
        self.cuda = StandinCuda([gpu])
        self.trt = make_trt(self.cuda, generation=generation)
        self.engine = TensorRTEngine(trt=self.trt, cuda=self.cuda)

    def update(self) -> list[str]:
        table = tomllib.loads(self.config.read_text())["updater"]
        repo = Repository(self.data)
        agent = make_agent(table, self.data, repo, self.engine, load_profile(PROFILE))
        try:
            return asyncio.run(agent.check_once())
        finally:
            agent.close()
            repo.close()

    def cached_plans(self) -> list[Path]:
        return sorted((self.data / "engines").glob("*.plan"))

    def staged_parts(self) -> list[Path]:
        return sorted((self.data / "staging" / "downloads").glob("*.part"))


@pytest.fixture
def release(tmp_path, demo_files, capsys):
    """Release identity 2 with a plan compiled on an Orin with TensorRT 10.3 attached."""
    fleet = Fleet(tmp_path / "fleet")
    model = scaling_model(tmp_path / "double.onnx")
    folder = tmp_path / "release"
    folder.mkdir()
    config, samples = make_release_samples(model, None, None, folder)
    fleet.repo.publish("identity", 2, model, config, samples)
    plan = tmp_path / "double.plan"
    printed = _compile(model, config, plan, tmp_path / "ref", capsys)
    out = run_outpost("fleet", "attach-engine", fleet.dir, "identity", "2", plan,
                      "--profile", PROFILE)
    assert out.returncode == 0, out.stderr
    assert "attached" in out.stdout and PROFILE in out.stdout
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    fleet.start()
    yield {"fleet": fleet, "model": model, "config": config, "plan": plan,
           "plan_sha": file_sha256(plan), "printed": printed}
    fleet.stop()


def _compile(model, config, out, data, capsys, gpu=ORIN, generation=10) -> str:
    cuda = StandinCuda([gpu])
    ref = TensorRTEngine(trt=make_trt(cuda, generation=generation), cuda=cuda)
    args = build_parser().parse_args([
        "compile", str(model), "--profile", PROFILE, "--config", str(config), "-o", str(out),
        "--data-dir", str(data), "--no-progress"])
    assert compile_model(args, engine=ref) == 0
    return capsys.readouterr().out


def _validated_reports(fleet: Fleet) -> list[str]:
    with sqlite3.connect(fleet.dir / "fleet.db") as db:
        return [r[0] for r in db.execute("select detail from reports where state = "
                                         "'validated' order by id")]


def _served(device: Device, x: np.ndarray):
    """What the device's active version answers, loaded as a server loads it, and the
    artifact it was loaded from."""
    from appliance.models.loaded import build_options
    from engines import RuntimeOptions

    repo = Repository(device.data)
    try:
        record = repo.version("identity", active_version(device.data))
    finally:
        repo.close()
    opts = build_options(record.config(), load_profile(PROFILE))
    art = device.engine.prepare(record.model_file, opts, device.data / "engines")
    session = device.engine.load(art, opts, RuntimeOptions())
    try:
        return session.run({"x": x})["y"], art
    finally:
        session.close()


def test_a_matching_device_builds_nothing_and_serves_the_prebuilt_plan(release, short_tmp,
                                                                      demo_files):
    assert "plan key " in release["printed"]
    dev = Device(short_tmp / "dev", release["fleet"], demo_files["identity"])
    lines = dev.update()
    assert any("identity 1 -> 2: committed" in line for line in lines), lines
    assert dev.trt.builds == []  # no build ran
    assert dev.trt.deserialized == [release["plan_sha"]]  # the signed plan, once
    (cached,) = dev.cached_plans()
    assert file_sha256(cached) == release["plan_sha"]  # in the cache as if built here
    assert json.loads(meta_path(cached).read_text())["origin"].startswith("engines/identity/2/")
    assert dev.staged_parts() == []
    assert any(n.startswith("engine: prebuilt") for n in journal_notes(dev.data))
    assert any(d.startswith("engine: prebuilt") for d in _validated_reports(release["fleet"]))

    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    y, art = _served(dev, x)
    np.testing.assert_allclose(y, 2 * x)
    assert art.path == cached and dev.trt.builds == []  # served from the prebuilt plan

    again = dev.update()  # up to date: nothing fetched, nothing built
    assert not any("->" in line for line in again) and dev.trt.builds == []


def test_a_device_of_another_gpu_builds_once_and_never_takes_the_plan(release, short_tmp,
                                                                       demo_files):
    dev = Device(short_tmp / "dev", release["fleet"], demo_files["identity"], gpu=XAVIER)
    lines = dev.update()
    assert any("identity 1 -> 2: committed" in line for line in lines), lines
    assert len(dev.trt.builds) == 1
    assert release["plan_sha"] not in dev.trt.deserialized  # never deserialized
    (cached,) = dev.cached_plans()
    assert "origin" not in json.loads(meta_path(cached).read_text())
    notes = journal_notes(dev.data)
    built = [n for n in notes if n.startswith("engine: built")]
    assert built and "GPU Standin Xavier (sm 8.7) vs Standin Orin (sm 8.7)" in built[0], notes
    assert any(d.startswith("engine: built") for d in _validated_reports(release["fleet"]))


def test_a_device_of_another_tensorrt_version_builds_once(release, short_tmp, demo_files):
    dev = Device(short_tmp / "dev", release["fleet"], demo_files["identity"], generation=11)
    lines = dev.update()
    assert any("identity 1 -> 2: committed" in line for line in lines), lines
    assert len(dev.trt.builds) == 1 and dev.trt.builds[0]["version"] == "11.4.0"
    assert release["plan_sha"] not in dev.trt.deserialized
    built = [n for n in journal_notes(dev.data) if n.startswith("engine: built")]
    assert built and "TensorRT 11.4.0 vs 10.3.0" in built[0], built


@pytest.mark.parametrize("tamper", ["same length", "longer"])
def test_a_plan_whose_bytes_do_not_match_the_signed_hash_is_refused_before_deserialization(
        release, short_tmp, demo_files, tamper):
    fleet = release["fleet"]
    (served,) = (fleet.dir / "targets" / "engines" / "identity" / "2").glob("*.plan")
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data) + (b"x" * 100 if tamper == "longer" else b""))
    tampered_sha = hashlib.sha256(served.read_bytes()).hexdigest()

    dev = Device(short_tmp / "dev", fleet, demo_files["identity"])
    lines = dev.update()
    assert any("identity 1 -> 2: committed" in line for line in lines), lines
    assert tampered_sha not in dev.trt.deserialized  # refused before TensorRT saw it
    assert len(dev.trt.builds) == 1  # built here instead
    (cached,) = dev.cached_plans()  # the built plan only: nothing half-written
    assert "origin" not in json.loads(meta_path(cached).read_text())
    assert dev.trt.deserialized == [file_sha256(cached)]  # TensorRT saw that one only
    assert dev.staged_parts() == []
    notes = journal_notes(dev.data)
    assert any("was refused" in n and "built here instead" in n for n in notes), notes
    (report,) = [d for d in _validated_reports(fleet)]
    assert report.startswith("engine: built") and "refused" in report
    assert journal_rows(dev.data)[-1]["outcome"] == "committed"


@pytest.mark.parametrize("forged", ["built on another gpu", "built from another model"])
def test_a_signed_plan_that_does_not_deserialize_or_validate_here_is_dropped_and_built(
        tmp_path, short_tmp, demo_files, capsys, forged):
    """A sidecar that lies about its plan passes attach-engine's checks (they read the
    key): the device's own TensorRT and validation are the last word."""
    fleet = Fleet(tmp_path / "fleet")
    model = scaling_model(tmp_path / "double.onnx")
    folder = tmp_path / "release"
    folder.mkdir()
    config, samples = make_release_samples(model, None, None, folder)
    fleet.repo.publish("identity", 2, model, config, samples)
    honest = tmp_path / "honest.plan"
    _compile(model, config, honest, tmp_path / "ref", capsys)
    plan = tmp_path / "forged.plan"
    if forged == "built on another gpu":
        _compile(model, config, plan, tmp_path / "ref2", capsys, gpu=XAVIER)
    else:
        _compile(scaling_model(tmp_path / "triple.onnx", 3.0), config, plan,
                 tmp_path / "ref2", capsys)
    sidecar = json.loads(meta_path(honest).read_text())  # the honest key, other bytes
    sidecar.update(sha256=file_sha256(plan), bytes=plan.stat().st_size)
    meta_path(plan).write_text(json.dumps(sidecar))
    out = run_outpost("fleet", "attach-engine", fleet.dir, "identity", "2", plan,
                      "--profile", PROFILE)
    assert out.returncode == 0, out.stderr
    fleet.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    fleet.start()
    try:
        dev = Device(short_tmp / "dev", fleet, demo_files["identity"])
        lines = dev.update()
    finally:
        fleet.stop()
    assert any("identity 1 -> 2: committed" in line for line in lines), lines
    assert file_sha256(plan) in dev.trt.deserialized  # verified, then tried here
    assert len(dev.trt.builds) == 1  # and built instead
    (cached,) = dev.cached_plans()
    assert "origin" not in json.loads(meta_path(cached).read_text())
    assert dev.staged_parts() == []
    x = np.ones((1, 16), np.float32)
    np.testing.assert_allclose(_served(dev, x)[0], 2 * x)  # the model's own answer
    (report,) = _validated_reports(fleet)
    said = ("could not deserialize it here" if forged == "built on another gpu"
            else "the prebuilt plan failed validation")
    assert report.startswith("engine: built") and said in report, report


# -- fleet attach-engine: bad input is one clear line, nothing changed ----------------------


@pytest.fixture
def published(tmp_path, capsys):
    fleet = Fleet(tmp_path / "fleet")
    model = scaling_model(tmp_path / "double.onnx")
    folder = tmp_path / "release"
    folder.mkdir()
    config, samples = make_release_samples(model, None, None, folder)
    fleet.repo.publish("identity", 2, model, config, samples)
    plan = tmp_path / "double.plan"
    _compile(model, config, plan, tmp_path / "ref", capsys)
    return {"fleet": fleet, "model": model, "config": config, "plan": plan,
            "tmp": tmp_path, "capsys": capsys}


def _attach(fleet, plan, *, name="identity", version="2", profile=PROFILE):
    return run_outpost("fleet", "attach-engine", fleet.dir, name, version, plan,
                       "--profile", profile)


def _one_clear_line(out, *said):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, \
        out.stderr
    for s in said:
        assert s in out.stderr, out.stderr


def _signed_targets(fleet) -> dict:
    return json.loads((fleet.dir / "metadata" / "targets.json").read_text())["signed"]


def test_attach_engine_signs_the_plan_with_its_key_and_profile(published):
    fleet, plan = published["fleet"], published["plan"]
    out = _attach(fleet, plan)
    assert out.returncode == 0, out.stderr
    from engines.tensorrt.plan_key import read_plan_key

    key, meta = read_plan_key(plan)
    path = engine_path("identity", 2, PROFILE, key.digest)
    tf = _signed_targets(fleet)["targets"][path]
    assert tf["length"] == plan.stat().st_size
    assert tf["hashes"]["sha256"] == file_sha256(plan)
    about = tf["custom"]["engine"]
    assert about["profile"] == PROFILE and about["key"]["digest"] == key.digest
    assert about["source_sha256"] == file_sha256(published["model"])
    assert (fleet.dir / "targets" / "engines" / "identity" / "2" /
            f"{file_sha256(plan)}.{path.rsplit('/', 1)[1]}").read_bytes() == plan.read_bytes()
    again = _attach(fleet, plan)  # the same key twice: targets are immutable
    _one_clear_line(again, "has a plan for key", "already")


@pytest.mark.parametrize("case", ["no release", "unknown profile", "missing plan",
                                  "empty plan", "no key", "another model",
                                  "other settings"])
def test_attach_engine_refuses_bad_input_in_one_line_and_changes_nothing(published, case):
    fleet, plan, tmp = published["fleet"], published["plan"], published["tmp"]
    before = _signed_targets(fleet)
    if case == "no release":
        out, said = _attach(fleet, plan, version="7"), ("no release identity 7",)
    elif case == "unknown profile":
        out, said = _attach(fleet, plan, profile="jetson-nope"), ("unknown firmware "
                                                                  "profile 'jetson-nope'",)
    elif case == "missing plan":
        out, said = _attach(fleet, tmp / "nope.plan"), ("no such plan file",)
    elif case == "empty plan":
        (tmp / "empty.plan").write_bytes(b"")
        out, said = _attach(fleet, tmp / "empty.plan"), ("an empty file",)
    elif case == "no key":
        meta_path(plan).unlink()
        out, said = _attach(fleet, plan), ("its key can't be read", "outpost compile")
    elif case == "another model":
        other = tmp / "other.plan"
        _compile(scaling_model(tmp / "triple.onnx", 3.0), published["config"], other, tmp / "ref2",
                 published["capsys"])
        out, said = _attach(fleet, other), ("not from release identity 2's model.onnx",)
    else:  # compiled without the release's config.toml: the profile's batch of 8
        loose = tmp / "loose.plan"
        cuda = StandinCuda([ORIN])
        args = build_parser().parse_args([
            "compile", str(published["model"]), "--profile", PROFILE, "--precision", "fp32",
            "--config", str(published["config"]), "-o", str(loose), "--data-dir",
            str(tmp / "ref3"), "--no-progress"])
        assert compile_model(args, engine=TensorRTEngine(trt=make_trt(cuda), cuda=cuda)) == 0
        out, said = _attach(fleet, loose), ("precision fp32 in the plan, fp16 on the devices",
                                            "--config config.toml")
    _one_clear_line(out, *said)
    assert _signed_targets(fleet) == before
    assert not (fleet.dir / "targets" / "engines").exists()
