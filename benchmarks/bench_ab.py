"""A/B: servers from different code trees or cnn configs, interleaved in one run.

    git worktree add /tmp/before HEAD~1
    python -m benchmarks.bench_ab before=/tmp/before after=. \
        "after-b1=.:max_batch_size = 1" --points cnn:64,identity:1,identity:64

Each variant is NAME=CODE_TREE[:CNN_CONFIG] (CNN_CONFIG is config.toml text, ';' for a
newline). Every variant gets its own real server process started from its code tree, with
no flags; each round measures the raw engine (ONNX Runtime at its own defaults, batch 1
back to back: benchmarks/raw.py), then every variant's points in turn, so the shared
machine's drift falls on all of them alike. Printed, never asserted: medians over rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.client import Client  # noqa: E402
from appliance.demo.launcher import ServerProcess  # noqa: E402
from appliance.demo.models import BUILDERS  # noqa: E402
from appliance.models.repository import Repository  # noqa: E402
from benchmarks.bench_socket import CLEAN_ENV, _client  # noqa: E402
from benchmarks.raw import default_session, run_back_to_back  # noqa: E402


def parse_variant(text: str) -> tuple[str, Path, str]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"variant {text!r}: write NAME=CODE_TREE[:CNN_CONFIG]")
    tree, _, config = rest.partition(":")
    path = Path(tree or ".").resolve()
    if not (path / "appliance" / "__init__.py").is_file():
        raise SystemExit(f"variant {name!r}: {path} holds no appliance/ package")
    return name, path, config.replace(";", "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=CODE_TREE[:CNN_CONFIG]")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="per point")
    ap.add_argument("--points", default="cnn:64,identity:1,identity:64",
                    help="MODEL:CONCURRENCY, comma separated")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    points = []
    for p in args.points.split(","):
        model, _, c = p.partition(":")
        if model not in BUILDERS or not c.isdigit():
            raise SystemExit(f"point {p!r}: write MODEL:CONCURRENCY with a demo model")
        points.append((model, int(c)))

    with tempfile.TemporaryDirectory(prefix="op-ab-") as tmp_name:
        tmp = Path(tmp_name)
        files = {n: b(tmp / f"{n}.onnx") for n, b in BUILDERS.items()}
        servers: dict[str, ServerProcess] = {}
        try:
            for name, tree, config in variants:
                home = tmp / name
                (home / "cnn.toml").parent.mkdir(parents=True)
                (home / "cnn.toml").write_text(config)
                repo = Repository(home / "data")
                for model, path in files.items():
                    repo.add(model, path,
                             config_path=home / "cnn.toml" if model == "cnn" else None)
                repo.close()
                servers[name] = ServerProcess(
                    home / "data", home / "s.sock", env={**CLEAN_ENV, "PYTHONPATH": str(tree)},
                    extra_args=["--log-level", "warning"], cwd=tree).start(timeout_s=300)
                with Client(servers[name].socket_path) as client:
                    sizes = client.stats("cnn")["models"][0].get("preferred_batch_sizes")
                print(f"{name}: cnn preferred batch sizes {sizes or 'none'}", flush=True)
            cnn = default_session(files["cnn"])
            ident = default_session(files["identity"])
            rounds = []
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                for i in range(args.rounds):
                    row = {"raw": run_back_to_back(cnn, "cnn", args.seconds)["rps"],
                           "raw_us": run_back_to_back(ident, "identity", 1.0)["p50_ms"] * 1e3}
                    for name, server in servers.items():
                        for model, c in points:
                            row[(name, model, c)] = pool.apply(_client, ((
                                str(server.socket_path), model, c, args.seconds, "auto",
                                "async", 0),))
                    rounds.append(row)
                    print(f"round {i + 1}/{args.rounds} done", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    med = statistics.median
    raw_us = med(r["raw_us"] for r in rounds)
    print(f"\nmedians of {len(rounds)} rounds (raw cnn at its defaults: "
          f"{med(r['raw'] for r in rounds):.0f} img/s; raw identity call {raw_us:.1f} us)")
    for name in servers:
        for model, c in points:
            got = [r[(name, model, c)] for r in rounds]
            rps = med(g["rps"] for g in got)
            if model == "cnn":
                ratios = [g["rps"] / r["raw"] for g, r in zip(got, rounds)]
                extra = (f"{med(ratios):.1%} of raw (rounds: "
                         f"{', '.join(f'{x:.0%}' for x in ratios)})")
            elif c == 1:
                over = med(g["p50"] * 1e3 - r["raw_us"] for g, r in zip(got, rounds))
                extra = f"+{over:.0f} us p50 over the raw call"
            else:
                extra = ""
            print(f"  {name:12} {model:9} c={c:<3} {rps:9.0f} req/s  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
