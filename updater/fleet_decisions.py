"""Rollout decisions the fleet server signs by itself (a stage advance, a halt), made once
however many servers share the store.

Under the store's decision lock (PostgreSQL: a session advisory lock, so one replica at
a time; SQLite: one process, its threads in turn) the signed targets metadata is read
afresh and the decision checked against it: a rollout another replica already advanced
or halted, or that was replaced, is left alone. Then the decision is logged and committed
as 'signing', the metadata re-signed (FleetRepo.set_rollout, under the repository's file
lock as well, which keeps the CLI out), and the row marked 'signed' with the targets
version it made. A server killed between the two leaves a 'signing' row; whoever takes
the lock next settles it from the metadata: 'signed' if the metadata shows it, signed
now if it is still due, 'superseded' if the metadata moved past it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from tuf.api.metadata import Metadata

from updater.cohort import Rollout
from updater.fleet_db import FleetStore
from updater.fleet_repo import FleetRepo, release_path


@dataclass(frozen=True)
class Change:
    """What the server decided: ``action`` 'advance' (``from_fraction`` ->
    ``to_fraction``) or 'halt', of one release's rollout, why, and on which figures."""

    model: str
    version: int
    rollout_id: str
    action: str
    from_fraction: float
    to_fraction: float | None
    why: str
    figures: dict


def signed_rollout(repo: FleetRepo, model: str, version: int) -> tuple[int, Rollout | None]:
    """(targets version, the release's rollout) as the signed metadata has them now."""
    targets = Metadata.from_file(str(repo.metadata_dir / "targets.json")).signed
    tf = targets.targets.get(release_path(model, version))
    custom = tf.custom.get("rollout") if tf is not None else None
    return targets.version, Rollout.from_custom(custom) if custom else None


def why_not(change: Change, rollout: Rollout | None) -> str | None:
    """Why the signed ``rollout`` no longer calls for ``change`` (None: it does)."""
    if rollout is None or rollout.id != change.rollout_id:
        return "the rollout was replaced"
    if change.action == "halt":
        return "already halted" if rollout.state == "halted" else None
    if rollout.state != "active":
        return f"the rollout is {rollout.state}"
    if abs(rollout.fraction - change.from_fraction) > 1e-12:
        return f"the rollout is at {rollout.fraction:.0%} now, no longer at " \
               f"{change.from_fraction:.0%}"
    return None


def _sign(repo: FleetRepo, change: Change) -> int:
    if change.action == "halt":
        repo.set_rollout(change.model, change.version, state="halted")
    else:
        repo.set_rollout(change.model, change.version, fraction=change.to_fraction)
    return signed_rollout(repo, change.model, change.version)[0]


def apply_change(repo: FleetRepo, store: FleetStore, change: Change) -> int | None:
    """Sign ``change`` unless the signed metadata shows it done or overtaken: the targets
    version it signed, or None when there was nothing (left) to do. Blocking: the server
    runs it in a worker thread, holding its own lock (the store's connection is its)."""
    with store.decision_lock():
        _settle(repo, store)
        base, rollout = signed_rollout(repo, change.model, change.version)
        if why_not(change, rollout) is not None:
            return None
        row = store.log_decision({**change.__dict__, "base_version": base})
        if row is None:  # logged already on this very metadata
            return None
        version = _sign(repo, change)
        store.finish_decision(row, "signed", version)
        return version


def settle(repo: FleetRepo, store: FleetStore) -> int:
    """Settle decisions a stopped server logged but did not see signed; how many."""
    if not store.decisions(status="signing"):
        return 0
    with store.decision_lock():
        return _settle(repo, store)


def _settle(repo: FleetRepo, store: FleetStore) -> int:
    open_rows = store.decisions(status="signing")
    for d in open_rows:
        change = Change(d["model"], d["version"], d["rollout_id"], d["action"],
                        d["from_fraction"], d["to_fraction"], d["why"], d["figures"])
        version, rollout = signed_rollout(repo, change.model, change.version)
        if _shows(change, rollout):  # signed before its server stopped: find which
            if not _published(repo):  # stopped after targets, before the timestamp
                repo.refresh_timestamp(_ALWAYS)
            store.finish_decision(d["id"], "signed", _first_showing(
                repo, change, d["base_version"] + 1, version))
        elif why_not(change, rollout) is None:
            store.finish_decision(d["id"], "signed", _sign(repo, change))
        else:
            store.finish_decision(d["id"], "superseded", None)
    return len(open_rows)


_ALWAYS = timedelta(days=36500)  # refresh_timestamp's "expires within": any timestamp


def _published(repo: FleetRepo) -> bool:
    """Whether timestamp -> snapshot -> targets lead to the targets.json signed last (a
    server killed inside FleetRepo._write_targets may leave the chain short of it)."""
    def signed(role: str) -> dict:
        return json.loads((repo.metadata_dir / f"{role}.json").read_bytes())["signed"]

    snapshot = signed("snapshot")
    return (snapshot["meta"]["targets.json"]["version"] == signed("targets")["version"]
            and signed("timestamp")["meta"]["snapshot.json"]["version"]
            == snapshot["version"])


def _shows(change: Change, rollout: Rollout | None) -> bool:
    """Whether the signed rollout carries ``change``."""
    if rollout is None or rollout.id != change.rollout_id:
        return False
    if change.action == "halt":
        return rollout.state == "halted"
    return rollout.fraction >= (change.to_fraction or 0.0) - 1e-12


def _first_showing(repo: FleetRepo, change: Change, first: int, last: int) -> int | None:
    """The first targets version in first..last (N.targets.json) that carries ``change``."""
    for version in range(first, last + 1):
        try:
            targets = Metadata.from_file(
                str(repo.metadata_dir / f"{version}.targets.json")).signed
        except Exception:  # noqa: BLE001 - a version not kept: look at the next
            continue
        tf = targets.targets.get(release_path(change.model, change.version))
        custom = tf.custom.get("rollout") if tf is not None else None
        if custom and _shows(change, Rollout.from_custom(custom)):
            return version
    return None
