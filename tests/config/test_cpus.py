"""The usable CPUs: the affinity mask capped by the cgroup's CPU quota, read from a cgroup
tree the test writes (v2 cpu.max, v1 cfs quota and period)."""

from __future__ import annotations

import logging

import pytest

from appliance.config import cpus


def v2_tree(tmp_path, own: str, quotas: dict[str, str]):
    root = tmp_path / "cgroup"
    for folder, text in quotas.items():
        path = root / folder.lstrip("/") / "cpu.max"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_no_quota_leaves_the_affinity(tmp_path):
    root, proc = v2_tree(tmp_path, "/user.slice/app", {"/user.slice/app": "max 100000"})
    got = cpus.usable_cpus(root, proc, affinity=4)
    assert (got.count, got.quota) == (4, None) and "no cgroup quota" in got.reason


def test_a_container_quota_caps_the_cores(tmp_path):
    root, proc = v2_tree(tmp_path, "/system.slice/outpost.service",
                         {"/system.slice/outpost.service": "150000 100000"})
    got = cpus.usable_cpus(root, proc, affinity=4)
    assert got.count == 1 and got.quota == 1.5 and "quota 1.5" in got.reason
    assert cpus.usable_cpus(root, proc, affinity=1).count == 1  # affinity is tighter


def test_the_tightest_quota_on_the_way_up_counts(tmp_path):
    root, proc = v2_tree(tmp_path, "/kubepods/pod/c1", {
        "/kubepods": "300000 100000", "/kubepods/pod": "200000 100000",
        "/kubepods/pod/c1": "max 100000"})
    assert cpus.cgroup_quota(root, proc) == 2.0
    assert cpus.usable_cpus(root, proc, affinity=8).count == 2


def test_a_quota_below_one_core_plans_for_one_and_is_logged_once(tmp_path, caplog):
    root, proc = v2_tree(tmp_path, "/small", {"/small": "50000 100000"})
    cpus._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="outpost.cpus"):
        first = cpus.usable_cpus(root, proc, affinity=2)
        cpus.usable_cpus(root, proc, affinity=2)
    assert first.count == 1 and first.quota == 0.5 and "below one core" in first.reason
    assert len([r for r in caplog.records if "below one core" in r.getMessage()]) == 1


def test_cgroup_v1(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("250000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cpus.cgroup_quota(root, proc) == 2.5
    assert cpus.usable_cpus(root, proc, affinity=8).count == 2
    (folder / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert cpus.cgroup_quota(root, proc) is None


@pytest.mark.parametrize("text", ["garbage", "100000", "0 0", ""])
def test_unreadable_quota_files_mean_no_quota(tmp_path, text):
    root, proc = v2_tree(tmp_path, "/x", {"/x": text})
    assert cpus.cgroup_quota(root, proc) is None
    assert cpus.cgroup_quota(root, tmp_path / "missing") is None


def test_this_host():
    got = cpus.usable_cpus()
    assert 1 <= got.count <= got.affinity
