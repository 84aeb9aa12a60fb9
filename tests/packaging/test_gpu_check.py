"""build/gpu_check.sh and gpu_check.py: argument handling and skip reasons here, and every
step against the CUDA/TensorRT stand-ins (the real run needs an NVIDIA host)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.trt_standin import StandinCuda, make_trt

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "build" / "gpu_check.sh"


def check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "build" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def cuda_usable() -> bool:
    from engines.tensorrt.cuda import load_cuda, usable_gpus

    try:
        usable_gpus(load_cuda())
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False
    return True


def test_help_and_bad_arguments():
    helped = run_script("--help")
    assert helped.returncode == 0 and "--wheels DIR" in helped.stdout
    for args, words in [(["--batch", "0"], "--batch must lie in 1..256"),
                        (["--binding", "cupy"], "invalid choice: 'cupy'"),
                        (["--wheels"], "--wheels needs a folder"),
                        (["--wheels", "/nonexistent"], "is not a folder"),
                        (["--python", "/nonexistent/python"], "no Python at")]:
        proc = run_script(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr


def test_without_cuda_every_step_skips_with_its_reason():
    if cuda_usable():
        pytest.skip("this host has CUDA: the steps run instead")
    proc = run_script()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    binding = next(line for line in lines if "cuda-binding" in line)
    assert binding.startswith("SKIP") and "pycuda" in binding and "cuda-python" in binding
    for step in ("allocations", "pinned-copies", "streams", "batch-round-trip", "demo-cnn"):
        row = next(line for line in lines if f" {step} " in line)
        assert row.startswith("SKIP") and "needs a CUDA binding" in row
    assert lines[-1] == "summary: 0 ran, 7 skipped, 0 failed"
    required = run_script("--require-gpu")
    assert required.returncode == 1 and "FAIL  cuda-binding" in required.stdout


def test_every_step_runs_against_the_standins(tmp_path):
    cuda = StandinCuda()
    trt = make_trt(cuda)
    out = io.StringIO()
    code = check_module().main(["--batch", "2", "--keep", str(tmp_path)],
                               load_cuda=lambda _b: cuda, load_trt=lambda: trt, out=out)
    text = out.getvalue()
    assert code == 0, text
    for step in ("cuda-binding", "devices", "allocations", "pinned-copies", "streams",
                 "batch-round-trip", "tensorrt", "demo-cnn"):
        assert any(line.startswith("RAN") and f" {step} " in line
                   for line in text.splitlines()), (step, text)
    assert "match onnxruntime" in text and "cache hit" in text
    assert len(trt.builds) == 1  # the second prepare found the cached plan
    assert not cuda.device_allocs and not cuda.pinned_allocs  # everything freed


def test_tensorrt_missing_is_a_skip_and_a_failure_is_reported(tmp_path):
    from engines.errors import EngineUnavailable

    mod = check_module()
    cuda = StandinCuda()

    def no_trt():
        raise EngineUnavailable("the tensorrt Python package is not installed")

    out = io.StringIO()
    assert mod.main(["--batch", "1"], load_cuda=lambda _b: cuda, load_trt=no_trt, out=out) == 0
    assert "SKIP  tensorrt               the tensorrt Python package is not installed" \
        in out.getvalue()
    broken = make_trt(cuda, fail_execute=True)
    out = io.StringIO()
    assert mod.main(["--batch", "1", "--keep", str(tmp_path)], load_cuda=lambda _b: cuda,
                    load_trt=lambda: broken, out=out) == 1
    assert "FAIL  demo-cnn               RunError: TensorRT failed to enqueue" in out.getvalue()
