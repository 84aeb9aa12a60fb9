"""Real TensorRT on a real GPU: the demo CNN built, cached, served and compared with ONNX
Runtime, in each typing mode the installed TensorRT allows (weakly typed before 10.12,
strongly typed from a converted graph from 10.12, both on 10.12 to 10.x). Skipped, with the
reason, where TensorRT or a usable GPU is absent."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from appliance.demo.models import sample_inputs
from engines import BuildOptions, RuntimeOptions
from engines.tensorrt import TensorRTEngine, probe

pytestmark = pytest.mark.gpu

FP16_RTOL, FP16_ATOL = 1e-2, 5e-3  # softmax probabilities through an fp16 engine


@pytest.fixture(scope="module")
def gpu_engine():
    ok, reason = probe()
    if not ok:
        pytest.skip(f"TensorRT can't run here: {reason}")
    return TensorRTEngine()


@pytest.fixture(scope="module")
def reference(demo_files):
    return ort.InferenceSession(str(demo_files["cnn"]), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("typing", ["weak", "strong"])
@pytest.mark.parametrize("precision, rtol, atol", [("fp16", FP16_RTOL, FP16_ATOL),
                                                   ("fp32", 1e-4, 1e-5)])
def test_demo_cnn_matches_onnxruntime(gpu_engine, reference, demo_files, tmp_path, precision,  # noqa: PLR0917
                                      rtol, atol, typing):
    from engines.tensorrt.precision import STRONG_TYPING_FROM, parse_version

    version = parse_version(gpu_engine.version())
    if typing == "weak" and version[0] >= 11:
        pytest.skip(f"TensorRT {gpu_engine.version()} has no weak typing")
    if typing == "strong" and version < STRONG_TYPING_FROM:
        pytest.skip(f"outpost builds TensorRT {gpu_engine.version()} weakly typed")
    engine = TensorRTEngine(typing=typing)
    opts = BuildOptions(precision=precision, workspace_bytes=1 << 30, max_batch_size=8,
                        opt_batch_size=4)
    artifact = engine.prepare(demo_files["cnn"], opts, tmp_path)
    session = engine.load(artifact, opts, RuntimeOptions())
    try:
        session.warmup()
        for batch in (8, 1, 5):  # smaller after larger: reused buffers must not leak rows
            feeds = sample_inputs("cnn", batch=batch, seed=batch)
            got = session.run(feeds)["probs"]
            want = reference.run(["probs"], feeds)[0]
            assert got.shape == (batch, 10)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    finally:
        session.close()


def test_plan_is_cached_and_a_corrupt_one_rebuilt(gpu_engine, demo_files, tmp_path):
    import json

    from engines.base import file_sha256
    from engines.cache import meta_path

    opts = BuildOptions(precision="fp16", max_batch_size=2)
    art = gpu_engine.prepare(demo_files["cnn"], opts, tmp_path)
    mtime = art.path.stat().st_mtime_ns
    again = TensorRTEngine().prepare(demo_files["cnn"], opts, tmp_path)
    assert again.path == art.path and art.path.stat().st_mtime_ns == mtime
    # bytes TensorRT can't read, with a sidecar that agrees: only deserializing can tell
    art.path.write_bytes(b"\0" * 1024)
    meta = json.loads(meta_path(art.path).read_text())
    meta_path(art.path).write_text(json.dumps({**meta, "sha256": file_sha256(art.path)}))
    fresh = TensorRTEngine()
    rebuilt = fresh.prepare(demo_files["cnn"], opts, tmp_path)
    assert rebuilt.path.stat().st_size > 1024
    session = fresh.load(rebuilt, opts, RuntimeOptions())
    session.warmup()
    session.close()


def test_two_instances_run_side_by_side(gpu_engine, reference, demo_files, tmp_path):
    import threading

    opts = BuildOptions(precision="fp16", max_batch_size=4, opt_batch_size=2)
    art = gpu_engine.prepare(demo_files["cnn"], opts, tmp_path)
    sessions = [gpu_engine.load(art, opts, RuntimeOptions()) for _ in range(2)]
    errors = []

    def work(session, seed):
        try:
            for i in range(5):
                feeds = sample_inputs("cnn", batch=1 + (i % 4), seed=seed + i)
                np.testing.assert_allclose(session.run(feeds)["probs"],
                                           reference.run(["probs"], feeds)[0],
                                           rtol=FP16_RTOL, atol=FP16_ATOL)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, 10 * i)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    assert errors == []
