"""Fleet simulation: one real fleet server and N device agents in one process.

    python -m benchmarks.fleet_sim [--devices 500] [--thermal-share 0.3] [--shadow]

Prints the timeline (what the operator and the fleet did, and the version counts after
each poll round) and the final counts. ``--shadow`` runs the scenario twice, today's path
(the bad release is activated; the health watch rolls it back) and then with a shadow
phase on the bad release's rollout, and prints them side by side: the live requests the
bad release answered and how many of those answers were wrong, the devices that reported
it, and when the fleet halted it. Measured, never asserted.
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

ROWS = (("live requests v3 answered", "v3_live_answers"),
        ("  of them wrong (NaN)", "v3_bad_answers"),
        ("devices that answered wrongly", "v3_devices_bad_answers"),
        ("devices that answered with v3", "v3_took_then_left"),
        ("devices that reported it failing", "v3_devices_reported_failure"),
        ("devices that marked it bad", "v3_marked_bad"),
        ("fleet halted it after (s)", "v3_halted_at_s"),
        ("v3 rollout state", "v3_state"),
        ("final versions", "final_counts"))


def run(args, shadow: bool) -> dict:
    sim = Simulation(args.devices, thermal_share=args.thermal_share, shadow=shadow)
    try:
        return asyncio.run(sim.run())
    finally:
        if not args.keep:
            shutil.rmtree(sim.work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--thermal-share", type=float, default=0.3)
    p.add_argument("--shadow", action="store_true",
                   help="also run the bad release with a shadow phase; compare the two")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the timeline says what happened
    if not args.shadow:
        print(json.dumps(run(args, False), indent=2))
        return 0
    print("== today's path: v3 activated, the health watch rolls it back")
    watch = run(args, False)
    print("\n== shadow phase: v3 shadows the active version first")
    shadow = run(args, True)
    print(f"\n{'the bad release v3':34} {'health watch':>18} {'shadow phase':>18}")
    for label, key in ROWS:
        print(f"{label:34} {str(watch[key]):>18} {str(shadow[key]):>18}")
    print("\nshadow figures over the rollout:", json.dumps(shadow["v3_shadow"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
