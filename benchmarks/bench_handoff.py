"""What a batch's trip to its worker thread and back costs, against running it inline.

    python -m benchmarks.bench_handoff [--model cnn] [--rounds 20]

The batcher hands a batch to a ``ModelInstance`` (appliance/scheduling/instance.py): the
event loop puts the job on the instance's queue, its worker thread wakes and runs the
session, and the answer comes back to the loop with ``call_soon_threadsafe``. Two wake-ups
a request, which a server answering on the loop itself would not pay (the bare servers of
benchmarks/bare_servers.py call the session in the handler). Here, in one process on
uvloop, the same session (the engine as outpost loads it, an intra-op thread for each
core outpost may use (appliance/config/cpus.py), spinning) runs batch 1 both ways, each
run after a 0.5 ms pause as a sequential client's request comes; rounds interleave the
two, with a pause between them so that spinning threads park. Printed: the p50 of each,
and the median of the per-round differences.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.config.cpus import usable_cpus  # noqa: E402
from appliance.demo.models import BUILDERS, sample_inputs  # noqa: E402
from appliance.scheduling.instance import ModelInstance  # noqa: E402
from engines.base import BuildOptions, RuntimeOptions  # noqa: E402
from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: E402

GAP_S = 0.5e-3
RUNS = 40


async def measure(instance: ModelInstance, feeds: dict, rounds: int) -> dict[str, list]:
    loop = asyncio.get_running_loop()
    session = instance.session

    async def handed() -> None:
        fut = loop.create_future()

        def job() -> None:
            out = session.run(feeds)
            loop.call_soon_threadsafe(fut.set_result, out)

        instance.submit(job)
        await fut

    async def inline() -> None:
        session.run(feeds)

    ways = {"inline": inline, "handed": handed}
    times: dict[str, list] = {k: [] for k in ways}
    for rnd in range(rounds):
        for name in (ways if rnd % 2 == 0 else list(ways)[::-1]):
            await asyncio.sleep(0.15)  # spinning threads park between rounds
            runs = []
            for _ in range(RUNS):
                await asyncio.sleep(GAP_S)
                t0 = time.perf_counter()
                await ways[name]()
                runs.append(time.perf_counter() - t0)
            times[name].append(statistics.median(runs))
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn", choices=sorted(BUILDERS))
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="op-handoff-") as tmp:
        engine = OnnxRuntimeEngine()
        build = BuildOptions(max_batch_size=1)
        artifact = engine.prepare(BUILDERS[args.model](Path(tmp) / "m.onnx"), build,
                                  Path(tmp) / "engines")
        threads = usable_cpus().count
        session = engine.load(artifact, build, dataclasses.replace(
            RuntimeOptions(), intra_op_threads=threads, spinning=True))
        instance = ModelInstance(session, f"{args.model}-bench")
        feeds = sample_inputs(args.model)
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        try:
            times = run(measure(instance, feeds, args.rounds))
        finally:
            instance.stop()
    inline, handed = times["inline"], times["handed"]
    extra = statistics.median(h - i for h, i in zip(handed, inline))
    print(f"# {args.model}, batch 1, {threads} intra-op threads spinning, {args.rounds} rounds "
          f"of {RUNS} runs each way, a {GAP_S * 1e3:g} ms pause before each run")
    print(f"inline on the loop     p50 {statistics.median(inline) * 1e3:.3f} ms")
    print(f"handed to its worker   p50 {statistics.median(handed) * 1e3:.3f} ms")
    print(f"the hand-off and back: {extra * 1e6:+.0f} us a request (median of the rounds' "
          f"differences)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
