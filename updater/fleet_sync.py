"""`outpost fleet sync DIR DEST`: publish the fleet's TUF repository to a folder that a
plain static web server serves (nginx, a CDN's origin), or that an uploader copies to an
object store.

A device must never read metadata that names a file the host does not have yet, nor a
half-written file. So a sync writes in this order, each file atomically (a temp file in
the same folder, fsynced, renamed over the name; each phase's folders fsynced before the
next phase begins):

1. targets: every file the signed targets name, under the name devices ask for (hash-
   prefixed with consistent snapshots), each checked against its signed length and hashes
   as it is copied; a file already there under that name is kept;
2. the metadata but the timestamp: root versions, delegated roles, targets, snapshot
   (versioned names with consistent snapshots: a device reading the old view meanwhile
   is not disturbed);
3. ``timestamp.json``, last: the one file whose change makes devices see the new view;
4. only then, with ``prune``: target files the published metadata no longer names.

A sync killed anywhere leaves the view published before whole (and maybe new files that
nothing names yet, and a temp file the next sync removes). The source is read under the
repository's lock, so a sync never copies a view half re-signed; syncs into one DEST are
serialised by a lock file there. ``fleet serve --sync-to DEST`` runs the same sync each
time the repository's timestamp changes (``keep_synced``).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from engines.files import fsync_dir
from updater.errors import FleetRepoError, SyncError
from updater.fleet_repo import FleetRepo

log = logging.getLogger("outpost.fleet.sync")
FAULT_ENV = "OUTPOST_UPDATER_FAULT"  # the crash tests' kill switch, as the agent's
LOCK_NAME = ".outpost-sync.lock"  # in DEST, beside metadata/ and targets/ (not served)
TMP_SUFFIX = ".sync-tmp"
CHUNK = 1 << 20
# What published file names are made of (model names, versions, digests, roles).
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
_UPLOAD_ORDER = ("targets/, then metadata/ but timestamp.json, then metadata/timestamp.json "
                 "(docs/ota.md, 'Static hosting')")


def fault_point(name: str) -> None:
    """SIGKILL this process here when OUTPOST_UPDATER_FAULT names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class TargetCopy:
    name: str  # its path under targets/, as devices ask for it
    source: Path
    length: int
    hashes: dict[str, str]
    signed_by: str  # the metadata file that names it, for errors


@dataclass(frozen=True)
class View:
    """One consistent state of the repository, as devices read it."""

    targets: tuple[TargetCopy, ...]
    metadata: tuple[tuple[str, bytes], ...]  # (name under metadata/, bytes) in write order
    timestamp: bytes
    timestamp_version: int
    content_addressed: bool  # consistent snapshots: a target's name implies its bytes


@dataclass(frozen=True)
class SyncResult:
    dest: Path
    targets_copied: int
    targets_kept: int
    bytes_copied: int
    metadata_written: int
    timestamp_version: int
    timestamp_changed: bool
    pruned: int
    timestamp: bytes  # what was published, for keep_synced

    def describe(self) -> str:
        return (f"published to {self.dest}: target files {self.targets_copied} copied "
                f"({self.bytes_copied:,} B), {self.targets_kept} already there; metadata "
                f"files {self.metadata_written} written; timestamp version "
                f"{self.timestamp_version}" + ("" if self.timestamp_changed else " (unchanged)")
                + (f"; stale target files {self.pruned} pruned" if self.pruned else ""))


# -- DEST ----------------------------------------------------------------------------------

def parse_dest(text: str) -> Path:
    """DEST as given on the command line: a folder path, or a ``file://`` URL of one."""
    if "://" not in text:
        return Path(text)
    url = urlsplit(text)
    if url.scheme != "file":
        raise SyncError(f"DEST {text!r}: fleet sync writes to a folder (a path or "
                        f"file:///path); for an object store or a CDN, sync to a folder "
                        f"and upload it in the same order: {_UPLOAD_ORDER}")
    if url.netloc not in ("", "localhost") or not url.path.startswith("/") \
            or url.query or url.fragment:
        raise SyncError(f"DEST {text!r}: a file URL names a local folder as "
                        f"file:///absolute/path")
    return Path(unquote(url.path))


def check_dest(dest: Path, repo: FleetRepo) -> Path:
    """DEST, checked before anything is written: a folder this process may write, of its
    own (never the repository, which holds the keys), not holding another fleet."""
    dest = Path(dest)
    if not dest.exists():
        raise SyncError(f"DEST {dest}: no such folder; make it (mkdir -p {dest}) or name "
                        f"the folder your static server serves")
    if not dest.is_dir():
        raise SyncError(f"DEST {dest}: not a folder; name the folder your static server "
                        f"serves")
    real, source = dest.resolve(), repo.dir.resolve()
    if real == source or any(real.is_relative_to(source / p)
                             for p in ("metadata", "targets", "keys")):
        raise SyncError(f"DEST {dest} lies in the fleet repository {repo.dir}; publish to "
                        f"a folder of its own (a static server must never serve "
                        f"{repo.dir}: it holds the keys)")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise SyncError(f"DEST {dest}: this user can't write there; give it write access "
                        f"or choose another folder")
    ours, theirs = repo.metadata_dir / "1.root.json", dest / "metadata" / "1.root.json"
    try:
        if theirs.is_file() and theirs.read_bytes() != ours.read_bytes():
            raise SyncError(f"DEST {dest} holds another fleet's repository (its "
                            f"metadata/1.root.json differs from {ours}); sync into an "
                            f"empty folder")
    except OSError as exc:
        raise SyncError(f"DEST {dest}: {theirs} can't be read ({exc.strerror})") from exc
    return dest


@contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
    try:
        f = open(dest / LOCK_NAME, "a+b")  # noqa: SIM115 (held for the whole sync)
    except OSError as exc:
        raise SyncError(f"DEST {dest}: can't be written ({exc.strerror}); give this user "
                        f"write access or choose another folder") from exc
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# -- the source: one consistent view -------------------------------------------------------

def read_view(repo: FleetRepo) -> View:
    """The files devices read, in the order they must be published (under the lock: no
    re-sign can happen in between). Raises SyncError for a repository that is incomplete."""
    with repo.locked():
        return _read_view(repo.metadata_dir, repo.targets_dir)


def _read_view(meta_dir: Path, targets_dir: Path) -> View:
    from tuf.api.exceptions import LengthOrHashMismatchError  # noqa: PLC0415
    from tuf.api.metadata import Metadata  # noqa: PLC0415

    def load(name: str, kind: str, version: int | None = None):
        path = meta_dir / name
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SyncError(f"{path}: can't be read ({exc.strerror}); the repository is "
                            f"incomplete, nothing was published") from exc
        try:
            md = Metadata.from_bytes(raw)
        except Exception as exc:  # python-tuf raises several kinds for a bad file
            raise SyncError(f"{path}: not TUF metadata ({exc}); nothing was published"
                            ) from exc
        if md.signed.type != kind or version not in (None, md.signed.version):
            raise SyncError(f"{path}: holds {md.signed.type} version {md.signed.version}, "
                            f"not {kind}" + (f" version {version}" if version else "")
                            + "; nothing was published")
        return raw, md

    def checked(meta, raw: bytes, name: str, by: str) -> None:
        try:
            meta.verify_length_and_hashes(raw)
        except LengthOrHashMismatchError as exc:
            raise SyncError(f"{meta_dir / name} does not match what {by} signed ({exc}); "
                            f"nothing was published") from exc

    _, root = load("root.json", "root")
    consistent = bool(root.signed.consistent_snapshot)
    metadata = [(f"{v}.root.json", load(f"{v}.root.json", "root", v)[0])
                for v in range(1, root.signed.version + 1)]
    ts_raw, ts = load("timestamp.json", "timestamp")
    snap_meta = ts.signed.snapshot_meta
    snap_name = f"{snap_meta.version}.snapshot.json" if consistent else "snapshot.json"
    snap_raw, snap = load(snap_name, "snapshot", snap_meta.version)
    checked(snap_meta, snap_raw, snap_name, "timestamp.json")
    roles, targets = [], {}
    for role_file, meta in snap.signed.meta.items():
        if not _SEGMENT.fullmatch(role_file) or not role_file.endswith(".json"):
            raise SyncError(f"{meta_dir / snap_name}: role file name {role_file!r} can't "
                            f"be published as a plain file name")
        name = f"{meta.version}.{role_file}" if consistent else role_file
        raw, md = load(name, "targets", meta.version)
        checked(meta, raw, name, snap_name)
        roles.append((role_file == "targets.json", name, raw))
        for path, tf in md.signed.targets.items():
            served = path
            if consistent:
                head, sep, base = path.rpartition("/")
                served = f"{head}{sep}{next(iter(tf.hashes.values()))}.{base}"
            if not all(_SEGMENT.fullmatch(p) and not p.startswith(".")
                       for p in served.split("/")):
                raise SyncError(f"{meta_dir / name}: target {path!r} can't be published "
                                f"as a plain file path")
            source = targets_dir / served
            if not source.is_file() or source.stat().st_size != tf.length:
                raise SyncError(f"{source}: missing or not {tf.length} bytes long, though "
                                f"{name} names it; the repository is incomplete, nothing "
                                f"was published")
            targets[served] = TargetCopy(served, source, tf.length, dict(tf.hashes), name)
    # delegated roles before the top-level targets that delegate to them, snapshot last
    metadata += [(n, raw) for top, n, raw in sorted(roles, key=lambda r: r[0])]
    metadata.append((snap_name, snap_raw))
    return View(tuple(targets.values()), tuple(metadata), ts_raw, ts.signed.version,
                consistent)


# -- publishing ----------------------------------------------------------------------------

def sync(source: Path, dest: Path, *, prune: bool = False,
         fault: Callable[[str], None] = fault_point) -> SyncResult:
    """Publish repository ``source`` into folder ``dest``: targets, metadata, timestamp."""
    try:
        repo = FleetRepo(source)
    except FleetRepoError as exc:
        raise SyncError(f"DIR {exc}") from exc
    dest = check_dest(dest, repo)
    with _dest_lock(dest):
        view = read_view(repo)
        return _publish(view, dest, prune, fault)


def _publish(view: View, dest: Path, prune: bool, fault) -> SyncResult:
    targets_dir, meta_dir = dest / "targets", dest / "metadata"
    _remove_temps(dest)  # of a sync killed before; none runs now (the lock)
    old = _published_timestamp(meta_dir)
    copied = kept = nbytes = written = 0
    where = "targets/"
    try:
        touched: set[Path] = set()
        for t in view.targets:
            where = f"targets/{t.name}"
            dst = targets_dir / t.name
            if _already_there(dst, t, view.content_addressed):
                kept += 1
                continue
            nbytes += _copy_checked(t, dst, touched, dest, fault, where)
            copied += 1
            fault(f"sync:after:{where}")
        _fsync_all(touched)
        fault("sync:phase:targets")
        touched = set()
        for name, raw in view.metadata:
            where = f"metadata/{name}"
            dst = meta_dir / name
            if dst.is_file() and dst.read_bytes() == raw:
                continue
            _write_atomic(dst, raw, touched, dest)
            written += 1
            fault(f"sync:after:{where}")
        _fsync_all(touched)
        fault("sync:phase:metadata")
        where = "metadata/timestamp.json"
        changed = old != view.timestamp
        if changed:
            touched = set()
            _write_atomic(meta_dir / "timestamp.json", view.timestamp, touched, dest)
            _fsync_all(touched)
        fault("sync:phase:timestamp")
    except OSError as exc:
        raise SyncError(f"sync to {dest} stopped at {where}: {exc.strerror or exc}; devices "
                        f"still read the view published before it (every file it names is "
                        f"there); fix that and run the sync again") from exc
    pruned = 0
    if prune:
        try:
            pruned = _prune(targets_dir, {t.name for t in view.targets})
        except OSError as exc:
            raise SyncError(f"published to {dest}, but pruning stopped: {exc}; the new "
                            f"view is whole, run the sync again to prune") from exc
    return SyncResult(dest, copied, kept, nbytes, written, view.timestamp_version, changed,
                      pruned, view.timestamp)


def _published_timestamp(meta_dir: Path) -> bytes | None:
    try:
        return (meta_dir / "timestamp.json").read_bytes()
    except FileNotFoundError:
        return None


def _already_there(dst: Path, t: TargetCopy, content_addressed: bool) -> bool:
    """A target under a hash-prefixed name was written whole and checked by a sync before;
    without consistent snapshots the name says nothing, so the bytes are hashed."""
    if not dst.is_file() or dst.stat().st_size != t.length:
        return False
    if content_addressed:
        return True
    with open(dst, "rb") as f:
        hashers = _hashers(t)
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return all(h.hexdigest() == t.hashes[alg] for alg, h in hashers.items())


def _hashers(t: TargetCopy) -> dict:
    try:
        return {alg: hashlib.new(alg) for alg in t.hashes}
    except ValueError as exc:
        raise SyncError(f"{t.signed_by}: target {t.name} is signed with a hash this host "
                        f"can't compute ({exc}); nothing new was published") from exc


def _make_dirs(folder: Path, touched: set[Path], dest: Path) -> None:
    """Create ``folder`` and note it and each parent up to DEST for the phase's fsync."""
    folder.mkdir(parents=True, exist_ok=True)
    while folder != dest and folder not in touched:
        touched.add(folder)
        folder = folder.parent
    touched.add(dest)


def _temp_for(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{os.getpid()}{TMP_SUFFIX}")


def _copy_checked(t: TargetCopy, dst: Path, touched: set[Path], dest: Path, fault,
                  where: str) -> int:
    """Copy a target to ``dst`` through a temp file, refusing bytes it wasn't signed with."""
    _make_dirs(dst.parent, touched, dest)
    hashers = _hashers(t)
    tmp = _temp_for(dst)
    n = 0
    try:
        with open(t.source, "rb") as fin, open(tmp, "wb") as fout:
            while n <= t.length and (chunk := fin.read(CHUNK)):
                fout.write(chunk)
                for h in hashers.values():
                    h.update(chunk)
                n += len(chunk)
                fault(f"sync:partial:{where}")
            fout.flush()
            os.fsync(fout.fileno())
        if n != t.length or any(h.hexdigest() != t.hashes[alg] for alg, h in hashers.items()):
            raise SyncError(f"{t.source} does not match what {t.signed_by} signed (its "
                            f"length or hash); the repository's file is damaged, the "
                            f"published view is unchanged: restore the file and sync again")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _write_atomic(dst: Path, data: bytes, touched: set[Path], dest: Path) -> None:
    _make_dirs(dst.parent, touched, dest)
    tmp = _temp_for(dst)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_all(folders: set[Path]) -> None:
    # deepest first: a new folder's own entries before the entry that names it
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(folder)


def _remove_temps(dest: Path) -> None:
    for top in (dest / "metadata", dest / "targets"):
        for path in top.rglob(f".*{TMP_SUFFIX}") if top.is_dir() else ():
            path.unlink(missing_ok=True)


def _prune(targets_dir: Path, keep: set[str]) -> int:
    """Remove target files the published metadata no longer names, then empty folders."""
    if not targets_dir.is_dir():
        return 0
    pruned = 0
    for path in sorted(targets_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif path.relative_to(targets_dir).as_posix() not in keep:
            path.unlink()
            pruned += 1
    return pruned


# -- fleet serve --sync-to -----------------------------------------------------------------

async def keep_synced(source: Path, dest: Path, check_s: float = 1.0) -> None:
    """Publish to ``dest`` at start and whenever the repository's timestamp changes: every
    re-sign ends with a new timestamp (the server's halts, stage advances and renewals, and
    commands run beside it: promote, halt, publish, rotate-key)."""
    published: bytes | None = None
    last_error = ""
    ts = Path(source) / "metadata" / "timestamp.json"
    while True:
        try:
            if ts.read_bytes() != published:
                result = await asyncio.to_thread(sync, source, dest)
                published = result.timestamp
                last_error = ""
                if result.timestamp_changed or result.targets_copied:
                    log.info(result.describe(), extra={"dest": str(dest),
                                                       "timestamp": result.timestamp_version})
        except Exception as exc:  # keep serving; the next round retries
            if str(exc) != last_error:  # once per distinct failure, not every second
                log.error("sync to %s failed: %s (retrying every %gs)", dest, exc, check_s)
            last_error = str(exc)
        await asyncio.sleep(check_s)
