"""Instructions per request, counted by valgrind: an A/B that machine noise can't blur.

    python -m benchmarks.bench_instructions [before=/tmp/before] after=. \\
        [--paths server,batcher] [--requests 5000]

On a shared machine two timed runs of the same code differ by more than a small change
makes; the number of instructions the event loop thread executes per request does not.
Each code tree (NAME=TREE, default ``this=.``) is loaded in a child process under
``valgrind --tool=callgrind``, twice: warmed up, then N and N+R requests through one path
in-process (no sockets, no other process, the transport a stand-in that drops bytes); the
difference over R is the per-request count of the loop thread alone (worker threads
excluded). The raw engine call (ONNX Runtime's public ``InferenceSession.run``) is counted
the same way, and every path is also given as a ratio to it. Counts include the engine
call, which runs on the loop for the identity model. Needs valgrind (``apt install
valgrind``); about a minute per count. Printed, never asserted.

Paths: ``server`` (a frame handed to the connection until its answer is written),
``service`` (a decoded request map through routing, checks, batcher, engine and the
answer's encoding), ``batcher`` (a checked request through queue, batch, engine and
answer), ``engine`` (the appliance's session wrapper around the engine call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("server", "service", "batcher", "engine")
WARMUP = 200


def _child(path_name: str, count: int, model_dir: str) -> None:
    """Runs under valgrind: ``count`` requests through one path, after a warm-up."""
    import gc

    from appliance.demo.models import sample_inputs

    model = "identity"
    feeds = sample_inputs(model)
    if path_name == "raw":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(Path(model_dir) / "m.onnx"), so,
                                    providers=["CPUExecutionProvider"])

        def one() -> None:
            sess.run(None, feeds)
        succeeded = None
    else:
        one, succeeded = asyncio.new_event_loop().run_until_complete(_appliance_path(
            path_name, Path(model_dir), feeds))
    gc.freeze()
    for _ in range(WARMUP + count):
        one()
    if succeeded is not None and path_name != "engine" and succeeded() < WARMUP + count:
        raise SystemExit(f"only {succeeded()} of {WARMUP + count} requests succeeded: "
                         f"the count would be of a failing path")


async def _appliance_path(path_name: str, model_dir: Path, feeds: dict):
    """The callable that sends one request down the path, and the success count."""
    from appliance.config.load import load_config
    from appliance.models.manager import ModelManager
    from appliance.models.repository import Repository
    from appliance.protocol.frames import decode_body, encode_frame
    from appliance.protocol.tensors import encode_tensor
    from appliance.scheduling import batcher as batching
    from appliance.scheduling.window import window_for
    from appliance.serving.service import Service
    from appliance.transport.socket_ops import infer_request
    from appliance.transport.socket_server import Connection, SocketServer
    from engines.onnxruntime_engine import OnnxRuntimeEngine

    batching.INLINE_MAX_S = 1.0  # the identity model runs on the loop, as when served
    data = Path(tempfile.mkdtemp(prefix="op-icount-"))
    repo = Repository(data)
    repo.add("identity", model_dir / "m.onnx")
    config = load_config(None, {"data_dir": str(data)})
    manager = ModelManager(repo, OnnxRuntimeEngine(), config)
    await manager.load_all()
    service = Service(manager)
    lv = manager.loaded[("identity", 1)]
    lv.batcher._timed = batching.INLINE_MIN_SAMPLES  # as if measured quick: runs inline
    lv.batcher._compute_ewma_s = 0.0
    session = next(iter(lv.batcher._load)).session
    frame = encode_frame({"op": "infer", "id": 1, "model": "identity",
                          "inputs": {k: encode_tensor(v) for k, v in feeds.items()}})
    body = frame[4:]
    window = window_for(asyncio.get_running_loop())
    checked = infer_request(decode_body(body)).inputs

    if path_name == "server":
        conn = Connection(SocketServer(service, config), needs_hello=False)  # not started
        conn.connection_made(_DroppingTransport())
        n = len(frame)

        def one() -> None:
            conn.get_buffer(-1)[:n] = frame
            conn.buffer_updated(n)
    elif path_name == "service":
        def one() -> None:
            window.open()
            service.infer(infer_request(decode_body(body)), lambda response, err: None)
            window.close()
    elif path_name == "batcher":
        def one() -> None:
            window.open()
            lv.submit(lv.request_from_arrays(checked, None, None, lambda out, err: None))
            window.close()
    else:
        def one() -> None:
            session.run(checked)
    return one, lambda: lv.stats.request_success


class _DroppingTransport:
    def writelines(self, parts) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _loop_thread_instructions(tree: Path, path_name: str, count: int, model_dir: Path) -> int:
    """This file runs as a script in the child, so ``appliance`` comes from ``tree``."""
    with tempfile.TemporaryDirectory(prefix="op-cg-") as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes",
             f"--callgrind-out-file={out}/cg", sys.executable, __file__,
             "--child", path_name, str(count), str(model_dir)],
            cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        for line in Path(f"{out}/cg-01").read_text().splitlines():  # thread 1: the loop
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("callgrind wrote no totals")


def _per_request(tree: Path, path_name: str, requests: int, model_dir: Path) -> float:
    with ThreadPoolExecutor(2) as pool:
        base, more = pool.map(lambda n: _loop_thread_instructions(
            tree, path_name, n, model_dir), (100, 100 + requests))
    return (more - base) / requests


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="*", default=["this=."], help="NAME=CODE_TREE")
    ap.add_argument("--paths", default="server",
                    help=f"comma separated, of {', '.join(PATHS)}")
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed; install it (apt install valgrind) to count "
              "instructions", file=sys.stderr)
        return 2
    paths = args.paths.split(",")
    if any(p not in PATHS for p in paths):
        ap.error(f"--paths takes {', '.join(PATHS)}")
    trees = []
    for text in args.trees:
        name, sep, tree = text.partition("=")
        path = Path(tree or ".").resolve()
        if not sep or not (path / "appliance" / "__init__.py").is_file():
            ap.error(f"{text!r}: write NAME=CODE_TREE, a tree holding appliance/")
        trees.append((name, path))

    sys.path.insert(0, str(ROOT))
    from appliance.demo.models import identity_model

    with tempfile.TemporaryDirectory(prefix="op-icount-model-") as model_dir:
        identity_model(Path(model_dir) / "m.onnx")
        raw = _per_request(ROOT, "raw", args.requests, Path(model_dir))
        print(f"# loop-thread instructions per identity request (valgrind), "
              f"{args.requests} requests a count")
        print(f"raw engine call (InferenceSession.run): {raw:,.0f}")
        for path_name in paths:
            for name, tree in trees:
                n = _per_request(tree, path_name, args.requests, Path(model_dir))
                print(f"{name:12} {path_name:8} {n:12,.0f}   {n / raw:5.2f}x the raw call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
