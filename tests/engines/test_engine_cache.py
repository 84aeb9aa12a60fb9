"""The engine cache: the key (DESIGN section 3) and building each key exactly once."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engines import BuildOptions, ShapeRange
from engines.cache import cache_key, get_or_build, meta_path
from engines.tensorrt import TensorRTEngine
from engines.tensorrt.cuda import GpuInfo
from tests.support.trt_standin import StandinCuda, make_trt

BASE = BuildOptions(max_batch_size=8, opt_batch_size=4,
                    shape_ranges={"x": ShapeRange((1, 4), (4, 4), (8, 4))})
# One changed value per build field: each must move the key.
CHANGED = {
    "precision": "fp16",
    "workspace_bytes": 2 << 30,
    "optimization_level": 4,
    "dla_core": 0,
    "gpu_fallback": False,
    "version_compatible": True,
    "max_batch_size": 16,
    "opt_batch_size": 2,
    "shape_ranges": {"x": ShapeRange((1, 4), (4, 4), (16, 4))},
}


def trt_engine(name="Orin", cc=(8, 7), version="10.3.0"):
    cuda = StandinCuda([GpuInfo(0, name, cc, 8 << 30)])
    return TensorRTEngine(trt=make_trt(cuda, version=version), cuda=cuda)


def test_every_build_field_is_covered():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(BuildOptions)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_each_build_field_changes_the_key(field):
    eng = trt_engine()
    changed = dataclasses.replace(BASE, **{field: CHANGED[field]})
    assert eng.key_for("a" * 64, changed) != eng.key_for("a" * 64, BASE)


@pytest.mark.parametrize("what, other", [
    ("onnx sha256", lambda: trt_engine().key_for("b" * 64, BASE)),
    ("TensorRT version", lambda: trt_engine(version="10.4.0").key_for("a" * 64, BASE)),
    ("GPU name", lambda: trt_engine(name="Xavier").key_for("a" * 64, BASE)),
    ("compute capability", lambda: trt_engine(cc=(8, 6)).key_for("a" * 64, BASE)),
])
def test_source_engine_and_device_change_the_key(what, other):
    assert other() != trt_engine().key_for("a" * 64, BASE), what


def test_nothing_else_changes_the_key(tmp_path, demo_files):
    eng = trt_engine()
    key = eng.key_for("a" * 64, BASE)
    # another engine object (a restart), shape ranges given in another order
    again = trt_engine().key_for("a" * 64, dataclasses.replace(
        BASE, shape_ranges=dict(reversed(list(BASE.shape_ranges.items())))))
    assert again == key
    # the same model bytes at another path, with another mtime, give the same artifact
    copy = tmp_path / "elsewhere" / "m.onnx"
    copy.parent.mkdir()
    copy.write_bytes(demo_files["mlp"].read_bytes())
    opts = BuildOptions(max_batch_size=4)
    a = eng.prepare(demo_files["mlp"], opts, tmp_path / "cache")
    b = eng.prepare(copy, opts, tmp_path / "cache")
    assert a.cache_key == b.cache_key and a.path == b.path


def test_key_material_is_order_independent():
    a = cache_key(source_sha256="s", kind="k", engine_version="1", device={"a": 1, "b": 2},
                  build_fields={"x": 1, "y": 2})
    b = cache_key(source_sha256="s", kind="k", engine_version="1", device={"b": 2, "a": 1},
                  build_fields={"y": 2, "x": 1})
    assert a == b and len(a) == 64


# -- get_or_build ---------------------------------------------------------------------------


def test_concurrent_builds_of_one_key_do_the_work_once(tmp_path):
    calls = []

    def build():
        calls.append(threading.get_ident())
        time.sleep(0.2)  # long enough for every other thread to arrive and wait
        return b"plan"

    results = []
    threads = [threading.Thread(target=lambda: results.append(
        get_or_build(tmp_path, "k1", ".plan", build, meta={"v": 1}))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(built for _, built in results) == [False] * 5 + [True]
    assert (tmp_path / "k1.plan").read_bytes() == b"plan"


def test_different_keys_build_in_parallel(tmp_path):
    both_started = threading.Barrier(2, timeout=10)

    def build():
        both_started.wait()  # raises BrokenBarrierError if the other key were blocked
        return b"x"

    errors = []

    def run(key):
        try:
            get_or_build(tmp_path, key, ".plan", build, meta={})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_processes_share_the_lock(tmp_path):
    script = (
        "import sys, time, pathlib\n"
        "from engines.cache import get_or_build\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "def build():\n"
        "    with open(d / 'builds.log', 'a') as f: f.write('x')\n"
        "    time.sleep(0.3)\n"
        "    return b'plan'\n"
        "print(get_or_build(d, 'shared', '.plan', build, meta={'v': 1})[1])\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["False", "False", "True"]
    assert (tmp_path / "builds.log").read_text() == "x"


def test_failed_build_leaves_nothing_and_frees_the_lock(tmp_path):
    def broken():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        get_or_build(tmp_path, "k", ".plan", broken, meta={})
    assert not (tmp_path / "k.plan").exists()
    path, built = get_or_build(tmp_path, "k", ".plan", lambda: b"ok", meta={})
    assert built and path.read_bytes() == b"ok"


@pytest.mark.parametrize("damage", ["sidecar gone", "sidecar other meta", "bytes changed",
                                    "engine refuses"])
def test_bad_cached_artifact_is_rebuilt(tmp_path, damage):
    path, _ = get_or_build(tmp_path, "k", ".plan", lambda: b"good", meta={"gpu": "Orin"})
    usable = lambda _p: None  # noqa: E731
    if damage == "sidecar gone":
        meta_path(path).unlink()
    elif damage == "sidecar other meta":
        meta = json.loads(meta_path(path).read_text())
        meta_path(path).write_text(json.dumps({**meta, "gpu": "Xavier"}))
    elif damage == "bytes changed":
        path.write_bytes(b"g00d")
    else:
        usable = lambda _p: "it does not deserialize"  # noqa: E731
    builds = []
    again, built = get_or_build(tmp_path, "k", ".plan",
                                lambda: builds.append(1) or b"fresh",
                                meta={"gpu": "Orin"}, usable=usable)
    assert built and builds == [1] and again.read_bytes() == b"fresh"


def test_good_cached_artifact_is_served(tmp_path):
    get_or_build(tmp_path, "k", ".plan", lambda: b"good", meta={"gpu": "Orin"})
    path, built = get_or_build(tmp_path, "k", ".plan", lambda: pytest.fail("rebuilt"),
                               meta={"gpu": "Orin"})
    assert not built and Path(path).read_bytes() == b"good"
