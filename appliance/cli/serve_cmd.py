"""`outpost serve`: run the server until SIGTERM."""

from __future__ import annotations

from appliance.cli.common import add_config_options, config_from_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the repository's models on the socket")
    add_config_options(p)
    p.add_argument("--socket", help="Unix socket path (server.socket_path)")
    p.add_argument("--socket-mode", help="octal mode of the socket file, like 0660")
    p.add_argument("--tcp", help="also listen on HOST:PORT (needs a token)")
    p.add_argument("--token-file", help="file holding the connection token")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="also serve the Open Inference Protocol v2 over HTTP (http.address)")
    p.add_argument("--grpc", metavar="HOST:PORT",
                   help="also serve Triton's KServe v2 gRPC protocol (grpc.address)")
    p.add_argument("--engine", help="auto | onnxruntime | tensorrt")
    p.add_argument("--profile", help="firmware profile name (default: detect)")
    p.add_argument("--threads", type=_threads, metavar="N|auto",
                   help="intra-op threads per model instance (threads.intra_op; auto: "
                        "measured per model)")
    p.add_argument("--max-frame-bytes", type=int, help="largest frame accepted")
    p.add_argument("--log-level", help="debug | info | warning | error")
    p.add_argument("--log-format", help="auto | json | text")
    p.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                   help="event loop implementation (auto: uvloop where installed)")
    p.add_argument("--demo", action="store_true",
                   help="add the embedded demo models to the repository first")
    p.set_defaults(func=serve)


def _threads(text: str) -> int | str:
    import argparse  # noqa: PLC0415

    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 1, or auto")


def serve(args) -> int:
    from appliance.app import run  # noqa: PLC0415
    from appliance.cli.update_cmd import device_agent  # noqa: PLC0415
    from appliance.observe.logs import setup_logging  # noqa: PLC0415

    config = config_from_args(
        args,
        **{"server.socket_path": args.socket, "server.socket_mode": args.socket_mode,
           "server.tcp": args.tcp, "server.token_file": args.token_file,
           "http.address": args.http, "grpc.address": args.grpc,
           "engine": args.engine, "profile": args.profile, "threads.intra_op": args.threads,
           "server.max_frame_bytes": args.max_frame_bytes,
           "logging.level": args.log_level, "logging.format": args.log_format})
    setup_logging(config.logging.level, config.logging.format)
    config.token()  # a token file that can't be read fails here, before anything starts
    config.http.token()
    config.grpc.token()
    if args.demo:
        from appliance.demo.models import ensure_demo_models  # noqa: PLC0415
        from appliance.models.repository import Repository  # noqa: PLC0415

        repo = Repository(config.data_path)
        ensure_demo_models(repo, config.batching)
        repo.close()
    return run(config, args.loop, make_agent=lambda service, repo, engine: device_agent(
        config, repo, engine, service))
