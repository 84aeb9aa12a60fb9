"""`outpost demo`: the embedded default. Builds the demo models, serves them from a real
server process, drives a short client workload and prints throughput and latency."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="serve the demo models and measure a short workload")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds of load per model and concurrency")
    p.add_argument("--data-dir", type=Path,
                   help="keep the demo's repository here (default: a temporary folder)")
    p.set_defaults(func=demo)


def demo(args) -> int:
    if args.data_dir:
        return _demo(args.data_dir, args.seconds)
    with tempfile.TemporaryDirectory(prefix="outpost-demo-") as tmp:
        return _demo(Path(tmp), args.seconds)


def _demo(data_dir: Path, seconds: float) -> int:
    from appliance.client import Client  # noqa: PLC0415
    from appliance.config.schema import BatchingConfig  # noqa: PLC0415
    from appliance.demo.launcher import ServerProcess  # noqa: PLC0415
    from appliance.demo.models import ensure_demo_models, sample_inputs  # noqa: PLC0415
    from appliance.demo.workload import closed_loop  # noqa: PLC0415
    from appliance.models.repository import Repository  # noqa: PLC0415
    from appliance.scheduling.tuning import Layout  # noqa: PLC0415

    data_dir.mkdir(parents=True, exist_ok=True)
    repo = Repository(data_dir)
    added = ensure_demo_models(repo, BatchingConfig())
    repo.close()
    print(f"outpost demo: repository {data_dir} ({', '.join(added) or 'models present'})")
    server = ServerProcess(data_dir)
    server.start()
    print(f"serving on {server.socket_path} (pid {server.pid}); {seconds:g} s of load each")
    try:
        with Client(server.socket_path) as client:
            for row in client.stats()["models"]:
                if row.get("layout"):
                    print(f"  {row['model']:9} {Layout(**row['layout']).describe()}")
        for model, concurrencies in (("identity", (1, 64)), ("mlp", (1, 64)),
                                     ("cnn", (1, 16))):
            inputs = sample_inputs(model)
            for c in concurrencies:
                result = asyncio.run(closed_loop(model, inputs, c, seconds,
                                                 path=server.socket_path))
                print("  " + result.line())
    finally:
        code = server.stop()
    print(f"server stopped cleanly (exit {code})" if code == 0
          else f"server exited with {code}; log: {server.log_path}")
    return 0 if code == 0 else 1
