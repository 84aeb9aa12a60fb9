"""The fleet's TUF repository on disk, made and signed with python-tuf's Metadata API.

Layout of a fleet directory (only ``metadata/`` and ``targets/`` are ever served)::

    DIR/metadata/1.root.json, N.targets.json, N.snapshot.json, timestamp.json
                (and unversioned copies of root, targets and snapshot for people)
    DIR/targets/releases/<name>/<sha256>.<version>.tar   one release: model, config,
                samples
    DIR/targets/engines/<name>/<version>/<sha256>.<profile>-<key>.plan   a prebuilt
                TensorRT plan of a release (`fleet attach-engine`, updater/prebuilt.py)

Consistent snapshots: metadata and targets are never overwritten but added under new
names, so a device refreshing while the fleet re-signs still reads one consistent set.
    DIR/keys/targets.pem, snapshot.pem, timestamp.pem    online keys
    DIR/keys/root.pem      the root key: move it offline after `fleet init`
    DIR/keys/report.key    the secret device report keys derive from (report_auth.py)
    DIR/fleet.db           device reports (the fleet server writes it)

A release is one TUF target whose ``custom`` holds ``model``, ``version`` and ``rollout``
(DESIGN section 5). Every change of a rollout re-signs targets, snapshot and timestamp
with the online keys under an exclusive file lock, writing each file atomically.
"""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engines.files import atomic_write_bytes, replace_synced
from updater.activation import ActivationPolicy, ActivationPolicyError
from updater.cohort import Release, Rollout
from updater.errors import FleetRepoError
from updater.plans import PlanError
from updater.shadow import ShadowPolicyError

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
SPEC_VERSION = "1.0.31"
RELEASE_FILES = ("model.onnx", "config.toml", "samples.npz")


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed, in days."""

    root_days: float = 365.0
    targets_days: float = 90.0
    snapshot_days: float = 7.0
    timestamp_days: float = 1.0

    def of(self, role: str) -> timedelta:
        return timedelta(days=getattr(self, f"{role}_days"))


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _generate_signer():
    from securesystemslib.signer import CryptoSigner  # noqa: PLC0415

    return CryptoSigner.generate_ed25519()


def load_signer(path: Path):
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_pem_private_key,
    )
    from securesystemslib.signer import CryptoSigner  # noqa: PLC0415

    try:
        key = load_pem_private_key(Path(path).read_bytes(), None)
    except FileNotFoundError as exc:
        raise FleetRepoError(f"{path}: no such key file; the fleet's keys are made by "
                             f"'outpost fleet init'") from exc
    except (ValueError, TypeError) as exc:
        raise FleetRepoError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
    return CryptoSigner(key)


def init_repo(directory: Path, *, expiry: Expiry = Expiry(),
              root_key_path: Path | None = None) -> Path:
    """Make a new fleet repository: keys, root (v1) and empty targets/snapshot/timestamp."""
    from tuf.api.metadata import Metadata, Root  # noqa: PLC0415

    directory = Path(directory)
    if (directory / "metadata" / "root.json").exists():
        raise FleetRepoError(f"{directory} already holds a fleet repository; use another "
                             f"directory or publish into this one")
    keys_dir = directory / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    root_signer = _generate_signer()
    signers = {role: _generate_signer() for role in ONLINE_ROLES}
    root = Root(expires=_now() + expiry.of("root"), consistent_snapshot=True)
    root.add_key(root_signer.public_key, "root")
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    md = Metadata(root)
    md.sign(root_signer)
    root_key_path = Path(root_key_path or keys_dir / "root.pem")
    for path, signer in [(root_key_path, root_signer),
                         *((keys_dir / f"{r}.pem", s) for r, s in signers.items())]:
        atomic_write_bytes(path, signer.private_bytes, 0o600)  # never readable by others
    raw = md.to_bytes(_serializer())
    atomic_write_bytes(directory / "metadata" / "1.root.json", raw)
    atomic_write_bytes(directory / "metadata" / "root.json", raw)
    (directory / "targets").mkdir(exist_ok=True)
    atomic_write_bytes(directory / "expiry.json", json.dumps(expiry.__dict__).encode())
    repo = FleetRepo(directory)
    repo.ensure_report_secret()
    with repo.locked():
        repo._write_targets({}, bump=False)
    return root_key_path


def _serializer():
    from tuf.api.serialization.json import JSONSerializer  # noqa: PLC0415

    return JSONSerializer(compact=False)


def target_url_path(path: str, sha256: str) -> str:
    """``releases/m/2.tar`` -> ``releases/m/<sha256>.2.tar`` (TUF consistent snapshots)."""
    head, _, name = path.rpartition("/")
    return f"{head}/{sha256}.{name}" if head else f"{sha256}.{name}"


def release_path(name: str, version: int) -> str:
    return f"releases/{name}/{version}.tar"


def delta_path(name: str, version: int, base: int) -> str:
    return f"deltas/{name}/{version}-from-{base}.delta"


def engine_path(name: str, version: int, profile: str, key_digest: str) -> str:
    """Where a prebuilt TensorRT plan of a release lives (updater/prebuilt.py)."""
    return f"engines/{name}/{version}/{profile}-{key_digest[:16]}.plan"


def _member_bytes(archive: bytes, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        return tar.extractfile(member).read()


def _member(archive: Path, member: str) -> bytes:
    try:
        return _member_bytes(Path(archive).read_bytes(), member)
    except (OSError, tarfile.TarError, KeyError, AttributeError) as exc:
        raise FleetRepoError(f"{archive}: can't read {member} from the release "
                             f"({exc})") from exc


def build_release_archive(model: Path, config: Path, samples: Path) -> bytes:
    """The release as an uncompressed tar of exactly RELEASE_FILES, fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, src in zip(RELEASE_FILES, (model, config, samples), strict=True):
            data = Path(src).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FleetRepo:
    """One fleet directory: read releases, change rollouts, re-sign."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys_dir = self.dir / "keys"
        if not (self.metadata_dir / "root.json").is_file():
            raise FleetRepoError(f"{self.dir}: not a fleet repository (no metadata/root.json); "
                                 f"make one with 'outpost fleet init {self.dir}'")
        try:
            self.expiry = Expiry(**json.loads((self.dir / "expiry.json").read_text()))
        except (OSError, ValueError, TypeError):
            self.expiry = Expiry()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise every writer (CLI commands, the fleet server's auto-halt)."""
        with open(self.dir / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- device report keys ---------------------------------------------------------------

    @property
    def report_secret_path(self) -> Path:
        return self.keys_dir / "report.key"

    def report_secret(self) -> bytes | None:
        """The secret device report keys derive from; None for a fleet made before it."""
        from updater.report_auth import parse_key  # noqa: PLC0415

        path = self.report_secret_path
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FleetRepoError(f"{path}: can't be read ({exc.strerror})") from exc
        try:
            return parse_key(text, str(path))
        except ValueError as exc:
            raise FleetRepoError(f"{exc}; restore it from a backup (devices hold keys "
                                 f"derived from it)") from exc

    def ensure_report_secret(self) -> bytes:
        """The secret, made (once, under the lock) for a fleet that has none yet."""
        from updater.report_auth import new_secret  # noqa: PLC0415

        with self.locked():
            secret = self.report_secret()
            if secret is None:
                secret = new_secret()
                self.keys_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.report_secret_path, secret.hex().encode() + b"\n", 0o600)
            return secret

    # -- reads ---------------------------------------------------------------------------

    def _load(self, role: str):
        from tuf.api.metadata import Metadata  # noqa: PLC0415

        path = self.metadata_dir / f"{role}.json"
        try:
            return Metadata.from_file(str(path))
        except Exception as exc:
            raise FleetRepoError(f"{path}: can't be read as TUF metadata: {exc}") from exc

    def releases(self) -> list[Release]:
        return [_release(path, tf.custom) for path, tf in
                sorted(self._load("targets").signed.targets.items())
                if path.startswith("releases/")]

    def target_file(self, path: str, sha256: str | None = None) -> Path:
        """Where a target lives: hash-prefixed, as consistent snapshots name it."""
        if sha256 is None:
            sha256 = self._load("targets").signed.targets[path].hashes["sha256"]
        return self.targets_dir / target_url_path(path, sha256)

    def release(self, name: str, version: int) -> Release:
        for rel in self.releases():
            if rel.model == name and rel.version == version:
                return rel
        raise FleetRepoError(f"the fleet has no release {name} {version}; 'outpost fleet "
                             f"status' lists the releases")

    # -- writes --------------------------------------------------------------------------

    def publish(self, name: str, version: int, model: Path, config: Path,
                samples: Path, delta_from: tuple[int, ...] = (),
                activation: ActivationPolicy | None = None) -> Release:
        """Add the release archive as a target (no rollout yet: no device takes it), and a
        delta from each version in ``delta_from`` (updater/delta.py). ``activation``:
        when devices may activate it (updater/activation.py; None: once validated)."""
        return self.publish_archive(name, version, build_release_archive(model, config,
                                                                         samples),
                                    delta_from, activation)

    def publish_archive(self, name: str, version: int, data: bytes,
                        delta_from: tuple[int, ...] = (),
                        activation: ActivationPolicy | None = None) -> Release:
        """Sign ``data`` as release name/version (publish() builds it; tests craft it)."""
        from tuf.api.metadata import TargetFile  # noqa: PLC0415

        path = release_path(name, version)
        try:
            if activation is not None:
                activation.check()  # before anything is written
        except ActivationPolicyError as exc:
            raise FleetRepoError(str(exc)) from None
        with self.locked():
            targets = dict(self._load("targets").signed.targets)
            if path in targets:
                raise FleetRepoError(f"release {name} {version} is already published; "
                                     f"releases are immutable: publish a new version")
            deltas = [self._delta_target(targets, name, version, base, data)
                      for base in dict.fromkeys(delta_from)]  # all checked before a write
            tf = TargetFile.from_data(path, data, ["sha256"])
            atomic_write_bytes(self.target_file(path, tf.hashes["sha256"]), data)
            tf.unrecognized_fields["custom"] = {"model": name, "version": version,
                                                "rollout": None}
            if activation is not None:
                tf.unrecognized_fields["custom"]["activation"] = activation.as_custom()
            targets[path] = tf
            for delta_tf, delta in deltas:
                if delta_tf is not None:
                    atomic_write_bytes(self.target_file(delta_tf.path,
                                                        delta_tf.hashes["sha256"]), delta)
                    targets[delta_tf.path] = delta_tf
            self._write_targets(targets)
        self.last_deltas = [tf.custom["delta"] if tf is not None else d for tf, d in deltas]
        return _release(path, tf.custom)

    def _delta_target(self, targets: dict, name: str, version: int, base: int,
                      archive: bytes):
        """(TargetFile, delta bytes) from release ``base``, or (None, why-not figures)
        when the delta would not be smaller than the release itself."""
        import hashlib  # noqa: PLC0415

        from tuf.api.metadata import TargetFile  # noqa: PLC0415

        from updater.delta import best_delta  # noqa: PLC0415

        base_path = release_path(name, base)
        if base == version or base_path not in targets:
            raise FleetRepoError(f"--delta-from {base}: the fleet has no earlier release "
                                 f"{name} {base}; 'outpost fleet status' lists them")
        old_model = _member(self.target_file(base_path,
                                             targets[base_path].hashes["sha256"]),
                            "model.onnx")
        new_model = _member_bytes(archive, "model.onnx")
        method, delta, sizes = best_delta(archive, old_model, new_model)
        about = {"model": name, "version": version, "base_version": base,
                 "base_sha256": hashlib.sha256(old_model).hexdigest(),
                 "base_length": len(old_model), "method": method, "sizes": sizes,
                 "release_length": len(archive)}
        if len(delta) >= len(archive):
            return None, about
        tf = TargetFile.from_data(delta_path(name, version, base), delta, ["sha256"])
        tf.unrecognized_fields["custom"] = {"delta": about}
        return tf, delta

    def release_member(self, name: str, version: int, member: str) -> bytes:
        """One file of a published release (model.onnx, config.toml, samples.npz)."""
        path = release_path(name, version)
        tf = self._load("targets").signed.targets.get(path)
        if tf is None:
            raise FleetRepoError(f"the fleet has no release {name} {version}; 'outpost fleet "
                                 f"status' lists the releases")
        return _member(self.target_file(path, tf.hashes["sha256"]), member)

    def attach_engine(self, name: str, version: int, plan: Path, *, profile: str,
                      key: dict, source_sha256: str) -> str:
        """Sign ``plan`` (a TensorRT plan of the release's model) as a target beside
        release name/version, its ``custom`` naming the plan key (``PlanKey.as_custom``),
        the firmware profile and the model's sha256; returns its target path. Refused when
        the release is missing, the plan is of another model, or one for this key is
        attached already (targets are immutable)."""
        import hashlib  # noqa: PLC0415

        from tuf.api.metadata import TargetFile  # noqa: PLC0415

        data = Path(plan).read_bytes()
        with self.locked():
            targets = dict(self._load("targets").signed.targets)
            rel = release_path(name, version)
            if rel not in targets:
                raise FleetRepoError(f"the fleet has no release {name} {version}; publish it "
                                     f"first with 'outpost fleet publish'")
            model = _member(self.target_file(rel, targets[rel].hashes["sha256"]),
                            "model.onnx")
            if hashlib.sha256(model).hexdigest() != source_sha256:
                raise FleetRepoError(
                    f"{plan} was built from a model whose sha256 is {source_sha256[:16]}..., "
                    f"not from release {name} {version}'s model.onnx; compile that file")
            path = engine_path(name, version, profile, key["digest"])
            if path in targets:
                raise FleetRepoError(f"release {name} {version} has a plan for key "
                                     f"{key['digest'][:16]} already ({path}); targets are "
                                     f"immutable: publish a new version to change it")
            tf = TargetFile.from_data(path, data, ["sha256"])
            atomic_write_bytes(self.target_file(path, tf.hashes["sha256"]), data)
            tf.unrecognized_fields["custom"] = {"engine": {
                "model": name, "version": version, "profile": profile,
                "source_sha256": source_sha256, "key": key}}
            targets[path] = tf
            self._write_targets(targets)
        return path

    def set_rollout(self, name: str, version: int, **changes) -> Rollout:
        """Start (fresh id), promote, pause, resume or halt a release's rollout; re-sign."""
        path = release_path(name, version)
        with self.locked():
            targets = dict(self._load("targets").signed.targets)
            tf = targets.get(path)
            if tf is None:
                raise FleetRepoError(f"the fleet has no release {name} {version}; publish it "
                                     f"first with 'outpost fleet publish'")
            current = tf.custom.get("rollout")
            rollout = changes.pop("new", False) or current is None
            if rollout:
                base = Rollout(id=f"{name}-{version}-{uuid.uuid4().hex[:8]}", fraction=0.0)
            else:
                base = Rollout.from_custom(current)
            fraction = changes.get("fraction", base.fraction)
            if not 0.0 <= fraction <= 1.0:
                raise FleetRepoError(f"fraction {fraction} must lie in 0..1")
            if not rollout and fraction < base.fraction:
                raise FleetRepoError(
                    f"fraction {fraction} is below the rollout's {base.fraction}; a promote "
                    f"only grows a cohort (halt it, or start a new rollout)")
            if changes.get("state", "active") not in ("active", "paused", "halted"):
                raise FleetRepoError(f"state {changes['state']!r}: active, paused or halted")
            if changes.get("shadow") is not None:
                try:
                    changes["shadow"].check()
                except ShadowPolicyError as exc:
                    raise FleetRepoError(f"rollout of {name} {version}: {exc}") from exc
            if changes.get("plan") is not None:
                try:
                    changes["plan"].check()
                except PlanError as exc:
                    raise FleetRepoError(f"rollout of {name} {version}: {exc}") from exc
            new = Rollout(**{**base.__dict__, **changes})
            if rollout or new.fraction != base.fraction:  # which stage brought whom, when
                new = dataclasses.replace(new, history=(*new.history,
                                                        (new.fraction, time.time())))
            tf.unrecognized_fields["custom"] = {**tf.custom, "rollout": new.as_custom()}
            self._write_targets(targets)
        return new

    def rotate_key(self, role: str, root_key: Path | None = None,
                   new_root_key: Path | None = None) -> int:
        """Give ``role`` a new key; returns the new root version.

        Root N+1 names the new key instead of the old ones and is signed by the current
        root key (for ``root`` itself, by the new root key too, as TUF requires); then
        targets, snapshot and timestamp are re-signed with the keys now in force. Devices
        fetch N+1.root.json on their next refresh and trust only the new key from then on.
        Safe to kill: the new private key is written beside the old (``.new``) before root
        N+1 and moved into place after it; run again, it finishes what was started.
        """
        from tuf.api.metadata import Metadata  # noqa: PLC0415

        if role not in ("root", *ONLINE_ROLES):
            raise FleetRepoError(f"role {role!r}: one of root, {', '.join(ONLINE_ROLES)}")
        root_key = Path(root_key or self.keys_dir / "root.pem")
        if role == "root":
            target = Path(new_root_key or root_key)
        else:
            target = self.keys_dir / f"{role}.pem"
        pending = target.with_name(target.name + ".new")
        with self.locked():
            root = self._load("root").signed
            if pending.exists():
                if load_signer(pending).public_key.keyid in root.roles[role].keyids:
                    self._finish_rotation(pending, target)  # root N+1 was written
                    return root.version
                pending.unlink()  # killed before root N+1: start again
            signer = load_signer(root_key)
            if signer.public_key.keyid not in root.roles["root"].keyids:
                raise FleetRepoError(f"{root_key} is not this fleet's root key; pass the "
                                     f"offline root key with --root-key")
            new = _generate_signer()
            atomic_write_bytes(pending, new.private_bytes, 0o600)
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(new.public_key, role)
            root.version += 1
            root.expires = _now() + self.expiry.of("root")
            md = Metadata(root)
            md.sign(signer)
            if role == "root":
                md.sign(new, append=True)
            raw = md.to_bytes(_serializer())
            atomic_write_bytes(self.metadata_dir / f"{root.version}.root.json", raw)
            atomic_write_bytes(self.metadata_dir / "root.json", raw)
            self._finish_rotation(pending, target)
            return root.version

    def _finish_rotation(self, pending: Path, target: Path) -> None:
        replace_synced(pending, target)
        os.chmod(target, 0o600)
        targets = dict(self._load("targets").signed.targets)
        self._write_targets(targets)  # signed again with the keys root now names

    def refresh_timestamp(self, min_left: timedelta) -> bool:
        """Re-sign snapshot and timestamp if the timestamp expires within ``min_left``."""
        with self.locked():
            ts = self._load("timestamp")
            if ts.signed.expires - _now() > min_left:
                return False
            self._write_snapshot_and_timestamp(self._load("targets").signed.version)
            return True

    def _write_targets(self, targets: dict, bump: bool = True) -> None:
        from tuf.api.metadata import Metadata, Targets  # noqa: PLC0415

        try:
            old_version = self._load("targets").signed.version if bump else 0
        except FleetRepoError:
            old_version = 0
        md = Metadata(Targets(version=old_version + 1, expires=_now() + self.expiry.of(
            "targets"), targets=targets))
        md.sign(load_signer(self.keys_dir / "targets.pem"))
        raw = md.to_bytes(_serializer())
        atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.targets.json", raw)
        atomic_write_bytes(self.metadata_dir / "targets.json", raw)
        self._write_snapshot_and_timestamp(md.signed.version)

    def _write_snapshot_and_timestamp(self, targets_version: int) -> None:
        from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp  # noqa: PLC0415

        def next_version(role: str) -> int:
            try:
                return self._load(role).signed.version + 1
            except FleetRepoError:
                return 1

        snap = Metadata(Snapshot(version=next_version("snapshot"),
                                 expires=_now() + self.expiry.of("snapshot"),
                                 meta={"targets.json": MetaFile(targets_version)}))
        snap.sign(load_signer(self.keys_dir / "snapshot.pem"))
        snap_bytes = snap.to_bytes(_serializer())
        atomic_write_bytes(self.metadata_dir / f"{snap.signed.version}.snapshot.json", snap_bytes)
        atomic_write_bytes(self.metadata_dir / "snapshot.json", snap_bytes)
        ts = Metadata(Timestamp(
            version=next_version("timestamp"), expires=_now() + self.expiry.of("timestamp"),
            snapshot_meta=MetaFile.from_data(snap.signed.version, snap_bytes, ["sha256"])))
        ts.sign(load_signer(self.keys_dir / "timestamp.pem"))
        atomic_write_bytes(self.metadata_dir / "timestamp.json", ts.to_bytes(_serializer()))


def _release(path: str, custom: dict) -> Release:
    rollout, activation = custom.get("rollout"), custom.get("activation")
    return Release(model=str(custom["model"]), version=int(custom["version"]),
                   target_path=path,
                   rollout=Rollout.from_custom(rollout) if rollout else None,
                   activation=(ActivationPolicy.from_custom(activation)
                               if activation is not None else None))


def releases_from_targets(targets, problems: list[str] | None = None) -> list[Release]:
    """The releases in a verified ``Targets`` object (the device side). A target this
    agent can't read is one it doesn't take; a rollout with a shadow limit out of range
    is named in ``problems`` (what and where), so the device can say why."""
    out = []
    for path, tf in sorted(targets.targets.items()):
        custom = tf.custom
        if not path.startswith("releases/") or not isinstance(custom, dict):
            continue
        try:
            out.append(_release(path, custom))
        except ShadowPolicyError as exc:
            if problems is not None:
                problems.append(f"release {path} not taken: its signed rollout has a bad "
                                f"{exc}; the fleet must start a new rollout with valid "
                                f"limits")
        except ActivationPolicyError as exc:  # never activated at the wrong time
            if problems is not None:
                problems.append(f"release {path} not taken: its signed activation policy "
                                f"is bad ({exc}); the fleet must publish a new version")
        except (KeyError, TypeError, ValueError):
            continue
    return out
