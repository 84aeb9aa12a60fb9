"""The raw engine the benchmarks compare against: the same ONNX model in an in-process
ONNX Runtime session, called back to back at batch 1.

``default_session`` is what a user who skips Outpost gets: ONNX Runtime at its own
defaults (its intra-op thread pool sized to the cores, its threads spinning). The headline
ratios are against it. ``layout_session`` runs with the threads and spinning the server
chose for the model, for the same-threads ratio printed beside the headline.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from appliance.demo.models import sample_inputs


def default_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def layout_session(path: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_back_to_back(sess, model: str, seconds: float, batch: int = 1) -> dict:
    """Rows/s and the p50 of one call, of ``session.run`` called back to back."""
    feeds = sample_inputs(model, batch=batch)
    sess.run(None, feeds)
    times = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 >= end:
            break
    return {"rps": batch * len(times) / sum(times), "p50_ms": statistics.median(times) * 1e3}
