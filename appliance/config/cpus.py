"""The CPUs this process may use: its affinity, capped by the cgroup's CPU quota.

A container or a systemd unit with ``CPUQuota=`` can give a process less CPU time than the
cores it sees (``os.cpu_count()``, even ``sched_getaffinity``): threads past the quota only
queue behind each other. The quota is read from cgroup v2 (``cpu.max``) or v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) of this process's own cgroup. A quota below
one core still leaves one core to use (logged once: the engine then runs slower than
measured elsewhere, as the quota says).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("outpost.cpus")

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class UsableCpus:
    count: int  # whole cores to plan threads and instances for, at least 1
    affinity: int  # CPUs in this process's affinity mask
    quota: float | None  # cores' worth of CPU time the cgroup allows; None: no quota
    reason: str

    def as_dict(self) -> dict:
        return {"count": self.count, "affinity": self.affinity, "quota": self.quota,
                "reason": self.reason}


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _own_cgroup(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path under the v2 hierarchy and under v1's cpu controller."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
                 ) -> float | None:
    """Cores' worth of CPU time this process's cgroup (or a parent of it) allows; None for
    no quota. The tightest quota on the way up to the root counts."""
    v2, v1 = _own_cgroup(proc_cgroup)
    quotas = []
    if v2 is not None:
        folder = root / v2.lstrip("/")
        while True:
            text = _read(folder / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    try:
                        quotas.append(int(quota) / int(period))
                    except (ValueError, ZeroDivisionError):
                        pass
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    if not quotas and v1 is not None:
        for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
            folder = base / v1.lstrip("/")
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period:
                try:
                    q, p = int(quota), int(period)
                except ValueError:
                    continue
                if q > 0 and p > 0:
                    quotas.append(q / p)
                break
    return min(quotas) if quotas else None


_LOGGED: set[str] = set()


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup"),
                affinity: int | None = None) -> UsableCpus:
    """The cores to plan for: the affinity mask, capped by the cgroup quota (rounded down,
    never below one)."""
    affinity = _affinity() if affinity is None else affinity
    quota = cgroup_quota(root, proc_cgroup)
    if quota is None or quota >= affinity:
        why = f"{affinity} CPUs in the affinity mask" + (
            f", cgroup quota {quota:g} cores" if quota is not None else ", no cgroup quota")
        return UsableCpus(affinity, affinity, quota, why)
    count = max(1, math.floor(quota + 1e-9))
    why = f"cgroup quota {quota:g} cores of the {affinity} CPUs in the affinity mask"
    if quota < 1:
        why += "; below one core, so one thread runs at that share of a core"
        if why not in _LOGGED:
            _LOGGED.add(why)
            log.warning("cpu quota below one core", extra={"quota": quota,
                                                           "affinity": affinity})
    return UsableCpus(count, affinity, quota, why)
