"""The fleet simulation, small: real fleet server, real agents over HTTP, one process.

The full run (500 devices, a 1,5,25,100 plan) is `python -m benchmarks.fleet_sim`;
`--devices 10000` the run at scale. Here the soak is 0.2 s.
"""

from __future__ import annotations

import asyncio
import shutil

from updater.sim import Simulation


def test_good_release_reaches_everyone_and_bad_canary_is_halted():
    # Half the devices see the inputs that break v3: a 30% canary of 100 devices holds
    # ~15 of them, so the failure share passes 10% with near certainty.
    sim = Simulation(100, thermal_share=0.5, plan=(0.3, 1.0), soak_s=0.2,
                     concurrency=16)  # on /dev/shm
    try:
        summary = asyncio.run(sim.run())
    finally:
        shutil.rmtree(sim.work, ignore_errors=True)
    assert summary["v3_state"] == "halted" and summary["v3_fraction"] == 0.3  # stage 1
    assert summary["v2_fraction"] == 1.0  # the plan advanced v2 by itself
    assert summary["final_counts"] == {"v2": 100}  # who took v3 went back to v2
    assert summary["v3_marked_bad"] >= 1
    assert summary["fleet_status"][next(k for k in summary["fleet_status"]
                                        if k.startswith("identity-2-"))] == {"committed": 100}
    assert any("fleet: halted identity v3" in line for line in sim.timeline)
    assert any("fleet: advanced identity v2 to 100% by itself" in line
               for line in sim.timeline)
    assert summary["reports"] > 100 and summary["server_peak_rss_mib"] > 0


def test_with_a_shadow_phase_the_bad_release_never_answers_and_is_halted():
    sim = Simulation(100, thermal_share=0.5, plan=(0.3, 1.0), soak_s=0.2, concurrency=16,
                     shadow=True)
    try:
        summary = asyncio.run(sim.run())
    finally:
        shutil.rmtree(sim.work, ignore_errors=True)
    assert summary["v3_state"] == "halted"
    assert summary["final_counts"] == {"v2": 100}
    assert summary["v3_bad_answers"] == 0  # the thermal devices rejected it in shadow
    assert summary["v3_devices_reported_failure"] >= 1
    status = summary["fleet_status"][next(k for k in summary["fleet_status"]
                                          if k.startswith("identity-3-"))]
    assert status.get("rejected_in_shadow", 0) == summary["v3_devices_reported_failure"]
    assert "rolled_back" not in status and "failed" not in status
    shadow = summary["v3_shadow"]
    assert shadow["rejected"] == summary["v3_marked_bad"] >= 1
    assert shadow["worst_disagreement"] == 1.0  # NaN on every cold reading
