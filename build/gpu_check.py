"""Exercise outpost's CUDA module and TensorRT engine for real on an NVIDIA host.

Runs without network: device buffers, pinned copies, streams and a batch round trip
through ``engines.tensorrt.cuda`` (pycuda or cuda.bindings), then, where TensorRT is
installed, the demo CNN built as an fp16 engine, served, and compared with ONNX Runtime,
once per typing mode outpost uses on that TensorRT: weakly typed (the FP16 builder flag)
before 10.12, strongly typed (the graph converted to fp16) on 11.x, and both on 10.12 to
10.x, where the flags still exist.
Every step prints RAN, SKIP (with the reason) or FAIL (with the error), and the figures it
measured. Exit status: 0 when nothing failed, 1 when a step failed (or, with
--require-gpu, when CUDA or a GPU is missing), 2 for bad arguments.

Run it through build/gpu_check.sh, or as ``PYTHONPATH=. python build/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

FP16_RTOL, FP16_ATOL = 1e-2, 5e-3  # softmax probabilities through an fp16 engine


class Skip(Exception):
    """This step can't run here; the message says why."""


class Report:
    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.rows: list[tuple[str, str, str]] = []

    def line(self, status: str, step: str, detail: str) -> None:
        self.rows.append((status, step, detail))
        print(f"{status:5} {step:22} {detail}", file=self.out, flush=True)

    def count(self, status: str) -> int:
        return sum(1 for s, _, _ in self.rows if s == status)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--binding", default="auto", choices=("auto", "pycuda", "cuda.bindings"),
                   help="CUDA binding to use (default: pycuda, else cuda.bindings)")
    p.add_argument("--device", type=int, default=0, help="GPU index (default 0)")
    p.add_argument("--batch", type=int, default=8, help="largest batch to run (default 8)")
    p.add_argument("--skip-tensorrt", action="store_true", help="only check CUDA")
    p.add_argument("--require-gpu", action="store_true",
                   help="fail, rather than skip, when no CUDA binding or GPU is usable")
    p.add_argument("--keep", type=Path, help="keep the built engines in this folder")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= 256:
        p.error("--batch must lie in 1..256")
    if args.device < 0:
        p.error("--device must be >= 0")
    return args


def step(report: Report, name: str, fn, *a):
    """Run one step; returns its result, or None when it skipped or failed."""
    try:
        result, detail = fn(*a)
    except Skip as why:
        report.line("SKIP", name, str(why))
        return None
    except Exception as exc:  # a check reports every failure and goes on
        report.line("FAIL", name, f"{type(exc).__name__}: {exc}")
        return None
    report.line("RAN", name, detail)
    return result


# -- CUDA ----------------------------------------------------------------------------------


def check_binding(load_cuda, binding, require):
    from engines.errors import EngineUnavailable

    try:
        api = load_cuda(binding)
    except EngineUnavailable as exc:
        if require:
            raise
        raise Skip(str(exc)) from exc
    return api, f"{api.name}"


def check_devices(api, index, require):
    from engines.errors import EngineUnavailable
    from engines.tensorrt.cuda import usable_gpus

    try:
        gpus = usable_gpus(api)
    except EngineUnavailable as exc:
        if require:
            raise
        raise Skip(f"no usable GPU: {exc}") from exc
    if index >= len(gpus):
        raise RuntimeError(f"--device {index} but the driver reports {len(gpus)} GPU(s)")
    detail = "; ".join(f"{g.index}: {g.name} {g.sm} {g.total_memory_bytes >> 20} MiB"
                       for g in gpus)
    return gpus[index], detail


def check_allocations(api, gpu):
    sizes = [1, 1 << 20, 64 << 20]
    with api.activate(gpu.index):
        bufs = [api.alloc(n) for n in sizes]
        ptrs = {b.ptr for b in bufs}
        for b in bufs:
            b.free()
    if len(ptrs) != len(sizes) or 0 in ptrs:
        raise RuntimeError(f"allocations returned pointers {sorted(ptrs)}")
    return None, f"device buffers of {', '.join(map(str, sizes))} bytes allocated and freed"


def check_pinned_copies(api, gpu):
    n = 64 << 20
    with api.activate(gpu.index):
        src, dst, dev = api.pinned(n), api.pinned(n), api.alloc(n)
        stream = api.stream()
        try:
            src.array[:] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
            dst.array[:] = 0
            api.copy_to_device(dev, src, n, stream)  # warm-up, then timed
            stream.synchronize()
            t0 = time.perf_counter()
            api.copy_to_device(dev, src, n, stream)
            stream.synchronize()
            t1 = time.perf_counter()
            api.copy_to_host(dst, dev, n, stream)
            stream.synchronize()
            t2 = time.perf_counter()
            same = np.array_equal(src.array, dst.array)
        finally:
            stream.close()
            for b in (src, dst, dev):
                b.free()
    if not same:
        raise RuntimeError("bytes copied to the device and back differ")
    return None, (f"64 MiB pinned round trip equal; H2D {n / (t1 - t0) / 1e9:.1f} GB/s, "
                  f"D2H {n / (t2 - t1) / 1e9:.1f} GB/s (one copy each)")


def check_streams(api, gpu):
    n = 4 << 20
    with api.activate(gpu.index):
        streams = [api.stream(), api.stream()]
        bufs = [(api.pinned(n), api.alloc(n), api.pinned(n)) for _ in streams]
        try:
            for i, ((src, dev, dst), s) in enumerate(zip(bufs, streams, strict=True)):
                src.array[:] = i + 1
                dst.array[:] = 0
                api.copy_to_device(dev, src, n, s)
                api.copy_to_host(dst, dev, n, s)
            for s in streams:
                s.synchronize()
            ok = all(np.all(dst.array == i + 1) for i, (_, _, dst) in enumerate(bufs))
        finally:
            for s in streams:
                s.close()
            for trio in bufs:
                for b in trio:
                    b.free()
    if not ok:
        raise RuntimeError("a stream's copies were lost or mixed with the other's")
    return None, "two streams, each H2D then D2H of 4 MiB, kept their own data"


def check_batch_round_trip(api, gpu, max_batch):
    shape = (max_batch, 3, 224, 224)
    nbytes = int(np.prod(shape)) * 4
    with api.activate(gpu.index):
        dev, host_in, host_out = api.alloc(nbytes), api.pinned(nbytes), api.pinned(nbytes)
        stream = api.stream()
        try:
            for batch in sorted({max_batch, 1, max(1, max_batch // 2)}, reverse=True):
                x = np.random.default_rng(batch).random((batch, *shape[1:]), dtype=np.float32)
                k = x.nbytes
                host_in.array[:k] = x.reshape(-1).view(np.uint8)
                api.copy_to_device(dev, host_in, k, stream)
                api.copy_to_host(host_out, dev, k, stream)
                stream.synchronize()
                back = host_out.array[:k].view(np.float32).reshape(x.shape)
                if not np.array_equal(back, x):
                    raise RuntimeError(f"batch {batch} came back different")
        finally:
            stream.close()
            for b in (dev, host_in, host_out):
                b.free()
    return None, (f"float32 batches of {max_batch}, {max(1, max_batch // 2)} and 1 x 3x224x224 "
                  f"through buffers sized for {max_batch}: equal")


# -- TensorRT -----------------------------------------------------------------------------


def check_tensorrt_import(load_trt):
    from engines.errors import EngineUnavailable

    try:
        trt = load_trt()
    except EngineUnavailable as exc:
        raise Skip(str(exc)) from exc
    return trt, f"tensorrt {trt.__version__}"


def typing_modes(trt) -> list[str]:
    """The typing modes outpost builds with on this TensorRT: strong from 10.12 (and weak too
    while 10.x still has the precision flags), weak before 10.12, strong only on 11."""
    from engines.tensorrt.precision import STRONG_TYPING_FROM, parse_version

    major, minor = parse_version(trt.__version__)
    if major >= 11:
        return ["strong"]
    return ["strong", "weak"] if (major, minor) >= STRONG_TYPING_FROM else ["weak"]


def check_demo_cnn(trt, api, gpu, max_batch, keep: Path | None):
    folder = keep or Path(tempfile.mkdtemp(prefix="outpost-gpu-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    details = [_demo_cnn_as(typing, trt, api, gpu, max_batch, folder)
               for typing in typing_modes(trt)]
    return None, " | ".join(details)


def _demo_cnn_as(typing, trt, api, gpu, max_batch, folder: Path) -> str:
    """The demo CNN built fp16 with one typing mode, cached, served and compared."""
    import onnxruntime as ort

    from appliance.demo.models import cnn_model, sample_inputs
    from engines import BuildOptions, RuntimeOptions
    from engines.tensorrt import TensorRTEngine

    model = cnn_model(folder / "cnn.onnx")
    opts = BuildOptions(precision="fp16", workspace_bytes=1 << 30, max_batch_size=max_batch,
                        opt_batch_size=max(1, max_batch // 2))
    engine = TensorRTEngine(trt=trt, cuda=api, device_index=gpu.index, typing=typing)
    path = engine.precision_path(opts)
    t0 = time.perf_counter()
    artifact = engine.prepare(model, opts, folder / "engines")
    build_s = time.perf_counter() - t0
    mtime = artifact.path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = TensorRTEngine(trt=trt, cuda=api, device_index=gpu.index, typing=typing).prepare(
        model, opts, folder / "engines")
    cached_s = time.perf_counter() - t0
    if again.path != artifact.path or again.path.stat().st_mtime_ns != mtime:
        raise RuntimeError(f"{typing}ly typed: a second prepare rebuilt the plan instead of "
                           f"using the cache")
    session = engine.load(artifact, opts, RuntimeOptions(device_id=gpu.index))
    try:
        session.warmup()
        ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch in sorted({max_batch, 1, max(1, max_batch // 2)}, reverse=True):
            feeds = sample_inputs("cnn", batch=batch, seed=batch)
            got = session.run(feeds)["probs"]
            want = ref.run(["probs"], feeds)[0]
            np.testing.assert_allclose(got, want, rtol=FP16_RTOL, atol=FP16_ATOL,
                                       err_msg=f"{typing}ly typed, batch {batch}")
            worst = max(worst, float(np.max(np.abs(got - want))))
        feeds = sample_inputs("cnn", batch=max_batch)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            session.run(feeds)
            times.append(time.perf_counter() - t)
    finally:
        session.close()
    how = (f"graph converted by {path.converter}" if path.convert_to else
           f"flags {', '.join(path.builder_flags)}" if path.builder_flags else "no flags")
    return (f"fp16 {typing}ly typed ({how}) on TensorRT {trt.__version__}: plan built in "
            f"{build_s:.1f} s ({artifact.path.stat().st_size >> 10} KiB), cache hit in "
            f"{cached_s:.2f} s; batches {max_batch}/.../1 match onnxruntime (max abs diff "
            f"{worst:.2e}); batch {max_batch} median "
            f"{statistics.median(times) * 1e3:.2f} ms over 20 runs, copies included")


def main(argv=None, *, load_cuda=None, load_trt=None, out=None) -> int:
    args = parse_args(argv)
    if load_cuda is None:
        from engines.tensorrt.cuda import load_cuda
    if load_trt is None:
        from engines.tensorrt import load_tensorrt as load_trt
    report = Report(out)
    print(f"outpost GPU check: Python {sys.version.split()[0]}, numpy {np.__version__}",
          file=report.out)
    api = step(report, "cuda-binding", check_binding, load_cuda, args.binding,
               args.require_gpu)
    gpu = step(report, "devices", check_devices, api, args.device, args.require_gpu) \
        if api is not None else None
    cuda_steps = [("allocations", check_allocations), ("pinned-copies", check_pinned_copies),
                  ("streams", check_streams)]
    if gpu is None:
        for name, _ in [*cuda_steps, ("batch-round-trip", None), ("tensorrt", None),
                        ("demo-cnn", None)]:
            report.line("SKIP", name, "needs a CUDA binding and a GPU (see above)")
    else:
        for name, fn in cuda_steps:
            step(report, name, fn, api, gpu)
        step(report, "batch-round-trip", check_batch_round_trip, api, gpu, args.batch)
        if args.skip_tensorrt:
            report.line("SKIP", "tensorrt", "--skip-tensorrt")
            report.line("SKIP", "demo-cnn", "--skip-tensorrt")
        else:
            trt = step(report, "tensorrt", check_tensorrt_import, load_trt)
            if trt is None:
                report.line("SKIP", "demo-cnn", "needs TensorRT (see above)")
            else:
                step(report, "demo-cnn", check_demo_cnn, trt, api, gpu, args.batch, args.keep)
    failed = report.count("FAIL")
    print(f"summary: {report.count('RAN')} ran, {report.count('SKIP')} skipped, "
          f"{failed} failed", file=report.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
