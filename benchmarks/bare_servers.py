"""The thinnest servers the libraries allow, for the benchmarks' "bare" rows: what any
Python server built on aiohttp or grpcio costs on this machine, measured with the same
client as outpost, so that a target out of reach of the library itself shows as such.

    python -m benchmarks.bare_servers {http,grpc} --port PORT NAME=MODEL.onnx ...

Each model is an ONNX Runtime session at its own defaults (the raw engine of
benchmarks/raw.py), called inline in the request's handler on the event loop: no batcher,
no queue, no thread hand-off, no validation, no metrics, no routing. Only what perf_analyzer
needs is served: health, model metadata and config, and infer with binary tensors (HTTP,
Triton's binary extension) or ``raw_input_contents`` (gRPC), FP32 only, batch 1 or more.
Malformed requests are not checked: this is a measuring stick, never a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Model:
    def __init__(self, name: str, path: str):
        from benchmarks.raw import default_session

        self.name = name
        self.session = default_session(Path(path))
        self.inputs = [(i.name, i.shape[1:]) for i in self.session.get_inputs()]
        self.outputs = [(o.name, o.shape[1:]) for o in self.session.get_outputs()]

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


@contextlib.contextmanager
def bare_server(protocol: str, files: dict[str, Path]):
    """A bare server over ``files`` (name -> ONNX file) in its own process, for the
    benchmarks; yields its HOST:PORT."""
    with socket.socket() as s:  # a free port (the benchmark is the only user here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bare_servers", protocol, "--port", str(port),
         *(f"{n}={p}" for n, p in files.items())],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "... listening on" once it accepts, "" if it died
        if "listening" not in line:
            raise RuntimeError(f"bare {protocol} server did not start (exit {proc.wait()})")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("protocol", choices=("http", "grpc"))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL.onnx")
    args = ap.parse_args()
    models = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        models[name] = Model(name, path)
    serve = serve_http if args.protocol == "http" else serve_grpc
    try:
        import uvloop  # outpost's loop where installed (--loop auto)

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(models, args.port))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
