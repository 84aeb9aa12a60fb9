"""The v2 HTTP codec alone: the committed codec (before) against the working tree's (after).

    python -m benchmarks.bench_http_codec [--old /tmp/old_codec.py] [--runs 60]

Cases, each timed old and new in alternation (so both see the same machine load), median
of ``--runs`` runs:

- ``parse json flat``: a 1x3x224x224 FP32 image as tritonclient sends it (``"data"`` flat,
  every float32 written as a Python float, about 3 MB, outputs asked for in binary);
- ``parse json nested``: the same image with ``data`` nested as its shape;
- ``parse json flat, 0/1 scan``: a flat image of only 0.0 and 1.0 (a mask), where the new
  codec must scan the element types for bools hidden among the numbers (its slow path;
  an image with few exact zeros and ones looks up just those);
- ``parse binary``: the image as binary tensor data (602,112 bytes after the header);
- ``encode json 1x1000``: a 1x1000 FP32 output (classifier logits) as JSON;
- ``encode binary 1x3x224x224``: a 602,112-byte FP32 output as binary data, joined into
  one body as the infer route does.

The old codec is ``git show HEAD:appliance/transport/http/codec.py`` (written to ``--old``
when that file is missing). Printed, never asserted: the machine is shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.transport.http import codec as new_codec  # noqa: E402

CODEC_PATH = "appliance/transport/http/codec.py"
IMAGE = (1, 3, 224, 224)


def load_old(path: Path):
    if not path.exists():
        text = subprocess.run(["git", "show", f"HEAD:{CODEC_PATH}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_codec", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_codec"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tritonclient_body(array: np.ndarray) -> bytes:
    """A JSON infer body as tritonclient writes it (or as close as the stdlib gets)."""
    try:
        import tritonclient.http as httpclient
    except ImportError:
        return json.dumps({"inputs": [{"name": "image", "shape": list(array.shape),
                                       "datatype": "FP32",
                                       "data": array.reshape(-1).tolist()}],
                           "parameters": {"binary_data_output": True}}).encode()
    inp = httpclient.InferInput("image", list(array.shape), "FP32")
    inp.set_data_from_numpy(array, binary_data=False)
    body, header_len = httpclient.InferenceServerClient.generate_request_body([inp])
    assert header_len is None
    return body if isinstance(body, bytes) else body.encode()


def nested_body(array: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": list(array.shape),
                                   "datatype": "FP32", "data": array.tolist()}]}).encode()


def binary_body(array: np.ndarray) -> tuple[bytes, str]:
    head = json.dumps({"inputs": [{"name": "image", "shape": list(array.shape),
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": array.nbytes}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
                      ).encode()
    return head + array.tobytes(), str(len(head))


def time_pair(old_fn, new_fn, runs: int) -> tuple[float, float]:
    """Medians in ms, old and new alternating run by run."""
    old_fn(), new_fn()  # warm
    old_t, new_t = [], []
    for _ in range(runs):
        for fn, out in ((old_fn, old_t), (new_fn, new_t)):
            t0 = time.perf_counter_ns()
            fn()
            out.append(time.perf_counter_ns() - t0)
    return median(old_t) / 1e6, median(new_t) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, default=Path("/tmp/old_codec.py"),
                    help="the codec before (default: HEAD's, written there if missing)")
    ap.add_argument("--runs", type=int, default=60)
    args = ap.parse_args()
    old = load_old(args.old)
    rng = np.random.default_rng(0)
    image = rng.standard_normal(IMAGE, dtype=np.float32)
    logits = rng.standard_normal((1, 1000), dtype=np.float32)

    flat = tritonclient_body(image)
    flat_scan = tritonclient_body(rng.integers(0, 2, IMAGE).astype(np.float32))
    nested = nested_body(image)
    binary, binary_hl = binary_body(image)
    print(f"bodies: flat JSON {len(flat):,} B, nested JSON {len(nested):,} B, 0/1 JSON "
          f"{len(flat_scan):,} B, binary {len(binary):,} B; runs {args.runs}; "
          f"numpy {np.__version__}")

    def parse(codec, raw, hl=None):
        return lambda: codec.parse_infer_body(raw, hl)

    def same_parse(raw, hl=None):
        a = old.parse_infer_body(raw, hl).inputs
        b = new_codec.parse_infer_body(raw, hl).inputs
        return all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)

    json_req = new_codec.parse_infer_body(
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}', None)
    bin_req = new_codec.parse_infer_body(
        b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],'
        b'"parameters":{"binary_data_output":true}}', None)

    def encode(codec, req, outputs):
        def run():
            chunks, header_len = codec.encode_infer_response("cnn", 1, req, outputs)
            return chunks[0] if header_len is None else b"".join(chunks)
        return run

    def same_encode(req, outputs):
        a, b = encode(old, req, outputs)(), encode(new_codec, req, outputs)()
        if a == b:
            return "bytes"
        head_a = json.loads(a[:len(a) - sum(v.nbytes for v in outputs.values())]
                            if req.binary_default else a)
        head_b = json.loads(b[:len(b) - sum(v.nbytes for v in outputs.values())]
                            if req.binary_default else b)
        if not req.binary_default:
            da, db = (np.array(h["outputs"][0].pop("data"), np.float32)
                      for h in (head_a, head_b))
            return "values" if head_a == head_b and np.array_equal(da, db) else "DIFFER"
        return "header" if head_a == head_b and a[-1000:] == b[-1000:] else "DIFFER"

    cases = [
        ("parse json flat (a)", parse(old, flat), parse(new_codec, flat), same_parse(flat)),
        ("parse json nested (a)", parse(old, nested), parse(new_codec, nested),
         same_parse(nested)),
        ("parse json flat, 0/1 scan", parse(old, flat_scan), parse(new_codec, flat_scan),
         same_parse(flat_scan)),
        ("parse binary 600 KB (c)", parse(old, binary, binary_hl),
         parse(new_codec, binary, binary_hl), same_parse(binary, binary_hl)),
        ("encode json 1x1000 (b)", encode(old, json_req, {"y": logits}),
         encode(new_codec, json_req, {"y": logits}), same_encode(json_req, {"y": logits})),
        ("encode binary 600 KB + join", encode(old, bin_req, {"y": image}),
         encode(new_codec, bin_req, {"y": image}), same_encode(bin_req, {"y": image})),
    ]
    print(f"{'case':30} {'before ms':>10} {'after ms':>10} {'ratio':>8}  same")
    for label, old_fn, new_fn, same in cases:
        runs = args.runs if "binary" not in label else args.runs * 10
        before, after = time_pair(old_fn, new_fn, runs)
        print(f"{label:30} {before:10.3f} {after:10.3f} {before / after:7.1f}x  {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
