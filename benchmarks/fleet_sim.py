"""Fleet simulation: one real fleet server and N device agents in one process.

    python -m benchmarks.fleet_sim [--devices 500] [--thermal-share 0.3]

Prints the timeline (what the operator and the fleet did, and the version counts after
each poll round) and the final counts. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from updater.sim import Simulation  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--thermal-share", type=float, default=0.3)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the timeline says what happened
    sim = Simulation(args.devices, thermal_share=args.thermal_share)
    try:
        summary = asyncio.run(sim.run())
    finally:
        if not args.keep:
            shutil.rmtree(sim.work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
