"""The thinnest servers the libraries allow, for the benchmarks' "bare" rows: what any
Python server built on aiohttp or grpcio costs on this machine, measured with the same
client as outpost, so that a target out of reach of the library itself shows as such.

    python -m benchmarks.bare_servers {http,grpc} --port PORT NAME=MODEL.onnx ...
    python -m benchmarks.bare_servers socket --path SOCKET NAME=MODEL.onnx ...

Each model is an ONNX Runtime session at its own defaults (the raw engine of
benchmarks/raw.py), called inline in the request's handler on the event loop: no batcher,
no queue, no thread hand-off, no validation, no metrics, no routing. Only what perf_analyzer
needs is served: health, model metadata and config, and infer with binary tensors (HTTP,
Triton's binary extension) or ``raw_input_contents`` (gRPC), FP32 only, batch 1 or more.
HTTP also takes JSON tensors: the body parsed by simdjson, each input's ``data`` copied
out in one C pass (as outpost's fast path does, appliance/transport/http/json_arrays.py),
the outputs written by orjson from the arrays: the least any Python JSON server does.
``socket``: frames over a Unix socket read straight into one buffer (asyncio's
BufferedProtocol), each ``u32 length, u8 model index, the first input's FP32 bytes at
batch 1``, answered ``u32 length, the first output's bytes``; a length of 0 means "the
input is at the start of the shared memory region named by ``--shm``" (a NumPy view of the
mapping, as outpost reads one). ``socket_loop`` is its client (blocking at c=1, asyncio
with a connection per request in flight above).
Malformed requests are not checked: this is a measuring stick, never a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


ANSWER_TIMEOUT_S = 30  # socket_loop's c=1 client gives up on an answer after this long


class Model:
    def __init__(self, name: str, path: str):
        from benchmarks.raw import default_session

        self.name = name
        self.session = default_session(Path(path))
        self.inputs = [(i.name, i.shape[1:]) for i in self.session.get_inputs()]
        self.outputs = [(o.name, o.shape[1:]) for o in self.session.get_outputs()]
        self.first_input = (self.inputs[0][0], (1, *self.inputs[0][1]))

    def metadata(self) -> dict:
        def tensors(items):
            return [{"name": n, "datatype": "FP32", "shape": [-1, *dims]} for n, dims in items]
        return {"name": self.name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": tensors(self.inputs), "outputs": tensors(self.outputs)}

    def config(self) -> dict:
        def tensors(items):
            return [{"name": n, "data_type": "TYPE_FP32", "dims": list(dims)}
                    for n, dims in items]
        return {"name": self.name, "platform": "onnxruntime_onnx", "max_batch_size": 32,
                "input": tensors(self.inputs), "output": tensors(self.outputs)}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


# -- HTTP: aiohttp, as outpost uses ------------------------------------------------------

def http_app(models: dict[str, Model]):
    from aiohttp import web

    async def ok(request):
        return web.Response()

    async def server_metadata(request):
        return web.json_response({"name": "bare", "version": "0", "extensions": []})

    async def metadata(request):
        return web.json_response(models[request.match_info["model"]].metadata())

    async def config(request):
        return web.json_response(models[request.match_info["model"]].config())

    async def infer(request):
        model = models[request.match_info["model"]]
        body = await request.read()
        if "Inference-Header-Content-Length" not in request.headers:
            return json_infer(model, body)
        head_len = int(request.headers["Inference-Header-Content-Length"])
        head = json.loads(body[:head_len])
        feeds, at = {}, head_len
        for i in head["inputs"]:
            size = i["parameters"]["binary_data_size"]
            feeds[i["name"]] = np.frombuffer(body, np.float32, size // 4, at).reshape(i["shape"])
            at += size
        results = model.run(feeds)
        outs = [{"name": n, "datatype": "FP32", "shape": list(r.shape),
                 "parameters": {"binary_data_size": r.nbytes}}
                for (n, _), r in zip(model.outputs, results)]
        out_head = json.dumps({"model_name": model.name, "model_version": "1",
                               "outputs": outs}).encode()
        return web.Response(body=b"".join([out_head, *(r.tobytes() for r in results)]),
                            headers={"Inference-Header-Content-Length": str(len(out_head))},
                            content_type="application/octet-stream")

    def json_infer(model: Model, body: bytes):
        import orjson
        import simdjson

        doc = simdjson.Parser().parse(body)
        feeds = {i["name"]: np.frombuffer(i["data"].as_buffer(of_type="d"), np.float64)
                 .astype(np.float32).reshape(list(i["shape"])) for i in doc["inputs"]}
        results = model.run(feeds)
        outs = [{"name": n, "datatype": "FP32", "shape": list(r.shape), "data": r.ravel()}
                for (n, _), r in zip(model.outputs, results)]
        return web.Response(body=orjson.dumps({"model_name": model.name, "model_version": "1",
                                               "outputs": outs},
                                              option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", ok)
    app.router.add_get("/v2/health/ready", ok)
    app.router.add_get("/v2/models/{model}", metadata)
    app.router.add_get("/v2/models/{model}/ready", ok)
    app.router.add_get("/v2/models/{model}/config", config)
    app.router.add_post("/v2/models/{model}/infer", infer)
    return app


async def serve_http(models: dict[str, Model], port: int) -> None:
    from aiohttp import web

    runner = web.AppRunner(http_app(models), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"bare http listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


# -- gRPC: grpcio's asyncio server, as outpost uses ---------------------------------------

async def serve_grpc(models: dict[str, Model], port: int) -> None:
    import grpc
    from google.protobuf import json_format

    from appliance.transport.grpc import inference_pb2 as pb
    from appliance.transport.grpc.inference_pb2_grpc import (
        GRPCInferenceServiceServicer,
        add_GRPCInferenceServiceServicer_to_server,
    )

    class Bare(GRPCInferenceServiceServicer):
        async def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=True)

        async def ServerMetadata(self, request, context):
            return pb.ServerMetadataResponse(name="bare", version="0")

        async def ModelReady(self, request, context):
            return pb.ModelReadyResponse(ready=request.name in models)

        async def ModelMetadata(self, request, context):
            return json_format.ParseDict(models[request.name].metadata(),
                                         pb.ModelMetadataResponse())

        async def ModelConfig(self, request, context):
            return json_format.ParseDict({"config": models[request.name].config()},
                                         pb.ModelConfigResponse())

        async def ModelInfer(self, request, context):
            model = models[request.model_name]
            feeds = {i.name: np.frombuffer(raw, np.float32).reshape(tuple(i.shape))
                     for i, raw in zip(request.inputs, request.raw_input_contents)}
            results = model.run(feeds)
            reply = pb.ModelInferResponse(model_name=model.name, model_version="1",
                                          id=request.id)
            for (n, _), r in zip(model.outputs, results):
                reply.outputs.add(name=n, datatype="FP32", shape=r.shape)
                reply.raw_output_contents.append(r.tobytes())
            return reply

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 0)])
    add_GRPCInferenceServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare grpc listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# -- the msgpack socket's floor: length-prefixed frames over a Unix socket -----------------

class SocketFrames(asyncio.BufferedProtocol):
    """Frames read into one growing buffer, each answered as soon as it is whole."""

    def __init__(self, models: list[Model], region: memoryview | None):
        self.models = models
        self.region = region
        self.buf = bytearray(1 << 20)
        self.filled = 0

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint: int):
        if len(self.buf) - self.filled < 1 << 16:
            self.buf.extend(bytes(len(self.buf)))
        return memoryview(self.buf)[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        view, at = memoryview(self.buf), 0
        while self.filled - at >= 5:
            size = int.from_bytes(view[at:at + 4], "little")
            if self.filled - at < 5 + size:
                break
            model = self.models[view[at + 4]]
            name, shape = model.first_input
            data = view[at + 5:at + 5 + size] if size else self.region
            x = np.frombuffer(data, np.float32, int(np.prod(shape))).reshape(shape)
            out = model.session.run(None, {name: x})[0]
            self.transport.writelines([out.nbytes.to_bytes(4, "little"), out.data])
            at += 5 + size
        del view
        if at:
            self.buf[:self.filled - at] = self.buf[at:self.filled]
            self.filled -= at


async def serve_socket(models: dict[str, Model], path: str, shm: str | None = None) -> None:
    import mmap
    import os

    region = None
    if shm:  # mapped as outpost maps one (no resource tracker to unlink it at exit)
        fd = os.open(f"/dev/shm/{shm.lstrip('/')}", os.O_RDWR)
        region = memoryview(mmap.mmap(fd, 0))
        os.close(fd)
    loop = asyncio.get_running_loop()
    await loop.create_unix_server(lambda: SocketFrames(list(models.values()), region), path)
    print(f"bare socket listening on {path}", flush=True)
    await asyncio.Event().wait()


def socket_loop(path: str, index: int, x: np.ndarray | None, concurrency: int,
                seconds: float, warmup_s: float = 0.5) -> dict:
    """A closed loop of ``concurrency`` requests in flight against ``serve_socket``: req/s
    and latency percentiles (ms) over ``seconds`` after ``warmup_s``. ``x`` None: the
    input is the one in the server's shared memory region."""
    import time

    from appliance.client.blocking import kernel_timeouts

    frame = ([(x.nbytes).to_bytes(4, "little") + bytes([index]), x.tobytes()] if x is not None
             else [bytes(4) + bytes([index])])
    times: list[float] = []

    def send_frame(sock) -> None:
        parts = [memoryview(p) for p in frame]
        while parts:  # one sendmsg may take part of it (a signal, the send timeout)
            sent = sock.sendmsg(parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            if sent:
                parts[0] = parts[0][sent:]

    def read_answer(sock) -> None:
        head = sock.recv(4, socket.MSG_WAITALL)
        if len(head) < 4:
            raise ConnectionError("the bare server closed the connection")
        need = int.from_bytes(head, "little")
        while need:
            got = len(sock.recv(need))
            if not got:
                raise ConnectionError("the bare server closed the connection")
            need -= got

    if concurrency == 1:
        with socket.socket(socket.AF_UNIX) as sock:
            # Kernel timeouts, as outpost's Client sets them (no poll() before each call):
            # a lost answer ends the run with an error instead of waiting for ever.
            kernel_timeouts(sock, ANSWER_TIMEOUT_S)
            sock.connect(path)
            start = time.perf_counter() + warmup_s
            stop = start + seconds
            while (t0 := time.perf_counter()) < stop:
                try:
                    send_frame(sock)
                    read_answer(sock)
                except BlockingIOError:  # SO_RCVTIMEO or SO_SNDTIMEO passed
                    raise ConnectionError(f"the bare server at {path} took no request or "
                                          f"sent no answer in {ANSWER_TIMEOUT_S} s") from None
                if t0 >= start:
                    times.append(time.perf_counter() - t0)
    else:
        async def one(start: float, stop: float) -> None:
            reader, writer = await asyncio.open_unix_connection(path)
            while (t0 := time.perf_counter()) < stop:
                writer.writelines(frame)
                need = int.from_bytes(await reader.readexactly(4), "little")
                await reader.readexactly(need)
                if t0 >= start:
                    times.append(time.perf_counter() - t0)
            writer.close()

        async def all_of_them() -> None:
            start = time.perf_counter() + warmup_s
            await asyncio.gather(*(one(start, start + seconds) for _ in range(concurrency)))

        asyncio.run(all_of_them())
    ms = np.array(times) * 1e3
    return {"rps": len(times) / seconds, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "failed": 0}


@contextlib.contextmanager
def bare_server(protocol: str, files: dict[str, Path], shm: str | None = None):
    """A bare server over ``files`` (name -> ONNX file) in its own process, for the
    benchmarks; yields its HOST:PORT (the socket's path for ``socket``, which maps the
    shared memory region ``shm`` where given)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="op-bare-") as tmp:
        if protocol == "socket":
            address = str(Path(tmp) / "bare.sock")
            where = ["--path", address, *(["--shm", shm] if shm else [])]
        else:
            with socket.socket() as s:  # a free port (the benchmark is the only user here)
                s.bind(("127.0.0.1", 0))
                address = f"127.0.0.1:{s.getsockname()[1]}"
            where = ["--port", address.rpartition(":")[2]]
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bare_servers", protocol, *where,
             *(f"{n}={p}" for n, p in files.items())],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()  # "... listening on" once it accepts; "": it died
            if "listening" not in line:
                raise RuntimeError(f"bare {protocol} server did not start "
                                   f"(exit {proc.wait()})")
            yield address
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocol", choices=("http", "grpc", "socket"))
    ap.add_argument("--port", type=int, help="http and grpc: listen on 127.0.0.1:PORT")
    ap.add_argument("--path", help="socket: listen on this Unix socket")
    ap.add_argument("--shm", help="socket: the shared memory region inputs may lie in")
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL.onnx")
    args = ap.parse_args()
    models = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        models[name] = Model(name, path)
    serve = {"http": serve_http, "grpc": serve_grpc, "socket": serve_socket}[args.protocol]
    where = args.path if args.protocol == "socket" else args.port
    if args.shm:
        serve = functools.partial(serve_socket, shm=args.shm)
    try:
        import uvloop  # outpost's loop where installed (--loop auto)

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(models, where))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
