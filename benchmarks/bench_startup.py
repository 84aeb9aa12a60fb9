"""Start-up time: from exec to ready (the socket answers `health` with ready: true).

Three models (the demo's identity, mlp and cnn) and warm engine caches: a first start adds
the models and prepares their engines; the timed starts after it only load. Measured for
the frozen one-folder build (the figure the target is about: at most 1.5 s), and, in the
same run for comparison, for the same code run from source (`python -m appliance serve`)
and, when it exists, the one-file build.

    python benchmarks/bench_startup.py [--exe dist/outpost/outpost] [--runs 7]
        [--also LABEL=OTHER_EXE]   # time another build alongside, run for run

Each start is split into "to serve()" (exec, imports, config: everything before the server
begins loading models) and "in serve()" (the server's own start_s log field: repository,
engine, model loads, listen), so a regression shows where it lies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.client import Client  # noqa: E402
from appliance.errors import OutpostError  # noqa: E402

TARGET_S = 1.5


def wait_ready(proc: subprocess.Popen, sock: Path, timeout_s: float = 60.0) -> float:
    """Poll `health` every millisecond; returns the monotonic time it first said ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        if sock.exists():
            try:
                with Client(sock, timeout_s=5) as c:
                    if c.health().get("ready"):
                        return time.monotonic()
            except OutpostError:
                pass
        time.sleep(0.001)
    raise SystemExit(f"not ready within {timeout_s} s")


def start_once(command: list[str], data_dir: Path, sock: Path, extra: list[str],
               env: dict) -> tuple[float, float | None]:
    """One start: seconds from exec to ready, and the server's own start_s."""
    log_path = data_dir / "bench-server.log"
    log_path.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*command, "serve", "--data-dir", str(data_dir), "--socket", str(sock),
             "--log-format", "json", *extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            ready = wait_ready(proc, sock) - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    start_s = None
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "ready":
            start_s = rec.get("start_s")
    return ready, start_s


def report(label: str, times: list[float], inner: list[float]) -> dict:
    med = statistics.median(times)
    med_inner = statistics.median(inner) if inner else float("nan")
    print(f"{label:28} median {med:6.3f} s  min {min(times):6.3f}  max {max(times):6.3f}  "
          f"(to serve() {med - med_inner:5.3f} s, in serve() {med_inner:5.3f} s; "
          f"{len(times)} runs)")
    return {"label": label, "median_s": med, "runs": times, "serve_s": med_inner}


def measure_all(candidates: list[tuple[str, list[str], dict]], tmp: Path,
                runs: int) -> list[dict]:
    """Warm each candidate's caches, then time the candidates in turn, run after run, so
    a change in the machine's load falls on all of them alike."""
    dirs = []
    for i, (_, command, env) in enumerate(candidates):
        data_dir = tmp / str(i)
        data_dir.mkdir()
        start_once(command, data_dir, data_dir / "bench.sock", ["--demo"], env)
        dirs.append(data_dir)
    times: list[list[float]] = [[] for _ in candidates]
    inner: list[list[float]] = [[] for _ in candidates]
    for _ in range(runs):
        for i, (_, command, env) in enumerate(candidates):
            t, s = start_once(command, dirs[i], dirs[i] / "bench.sock", [], env)
            times[i].append(t)
            if s is not None:
                inner[i].append(s)
    return [report(label, times[i], inner[i]) for i, (label, _, _) in enumerate(candidates)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exe", type=Path, default=ROOT / "dist" / "outpost" / "outpost",
                    help="the one-folder executable")
    ap.add_argument("--onefile", type=Path, default=ROOT / "dist" / "outpost-onefile",
                    help="the one-file executable (measured when it exists)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-source", action="store_true", help="skip the from-source figure")
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=EXE",
                    help="another build to time alongside, e.g. 'archived=/tmp/d/outpost/outpost'")
    args = ap.parse_args()
    if not args.exe.exists():
        print(f"{args.exe} does not exist: build it with build/freeze.sh", file=sys.stderr)
        return 2

    # The frozen builds run with a scrubbed environment, as a service would.
    frozen_env = {"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir()}
    source_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"start-up, exec to ready, 3 models, warm caches (target <= {TARGET_S} s for the "
          "one-folder build)")
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        candidates = [("frozen one-folder", [str(args.exe.resolve())], frozen_env)]
        for spec in args.also:
            label, _, path = spec.partition("=")
            candidates.append((label, [str(Path(path).resolve())], frozen_env))
        if args.onefile.exists():
            candidates.append(("frozen one-file", [str(args.onefile.resolve())], frozen_env))
        if not args.no_source:
            candidates.append(("source (python -m appliance)",
                               [sys.executable, "-m", "appliance"], source_env))
        results = measure_all(candidates, Path(tmp), args.runs)
    frozen = results[0]["median_s"]
    for r in results[1:]:
        print(f"one-folder / {r['label']}: {frozen / r['median_s']:.2f}x")
    verdict = "meets" if frozen <= TARGET_S else "MISSES"
    print(f"one-folder build {verdict} the {TARGET_S} s target: {frozen:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
