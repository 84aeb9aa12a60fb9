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


def test_slow_dropping_links_and_a_window_without_and_with_a_delta():
    """The --links scenario, small: every device ends on v2, the slow link broke and was
    resumed, and the fleet's count of bytes as deltas and as full files is the devices'."""
    from updater.sim_links import LinkScenario

    for deltas in (False, True):
        sim = LinkScenario(8, slow_share=0.25, deltas=deltas, slow_bytes_per_s=1_000_000,
                           clock_scale=60.0, poll_s=0.3, concurrency=8)
        try:
            r = asyncio.run(sim.run())
        finally:
            shutil.rmtree(sim.work, ignore_errors=True)
        assert (r["on_v2"], r["slow_devices"], r["errors"]) == (8, 2, {}), r
        kind = "delta" if deltas else "full"
        size = r["delta_bytes"] if deltas else r["release_bytes"]
        d = r["fleet_downloads"]
        assert d[kind] == {"devices": 8, "bytes": 8 * size}, d
        assert d["full_release_bytes"] == 8 * r["release_bytes"]
        assert r["bytes_moved"] >= 8 * size  # a resumed chunk may come twice
        if not deltas:  # 2.2 MB through a link that drops every 300 kB
            assert r["link_breaks"] >= 2 * 7, r
