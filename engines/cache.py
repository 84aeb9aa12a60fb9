"""The engine cache: content-addressed artifacts under ``<data_dir>/engines``.

The key hashes everything that makes a prepared artifact valid on a device
(DESIGN section 3), and nothing else, so a restart finds what it built before.
``get_or_build`` builds a key once however many threads or processes ask for it, and never
serves a file its sidecar or the engine disowns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from engines.base import file_sha256
from engines.files import atomic_write_bytes, replace_synced

log = logging.getLogger("outpost.engines")


def cache_key(
    *,
    source_sha256: str,
    kind: str,
    engine_version: str,
    device: dict,
    build_fields: dict,
) -> str:
    material = {
        "source_sha256": source_sha256,
        "kind": kind,
        "engine_version": engine_version,
        "device": device,
        "build": build_fields,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# -- building an artifact once ----------------------------------------------------------


@contextlib.contextmanager
def key_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Hold the build lock of ``key``: across threads and processes (flock on a lock file;
    every ``open`` is its own lock holder, so threads of one process exclude each other)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_meta(path: Path) -> dict | None:
    try:
        return json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return None


def get_or_build(
    cache_dir: Path,
    key: str,
    suffix: str,
    build: Callable[[], bytes],
    *,
    meta: dict,
    usable: Callable[[Path], str | None] = lambda _path: None,
) -> tuple[Path, bool]:
    """The cached artifact of ``key``, built by ``build()`` once if it is missing or bad.

    Returns ``(path, built)``. Under the key's lock: a cached file is served only when its
    sidecar (``<file>.json``) holds this ``meta`` and the file's sha256, and ``usable(path)``
    returns no complaint (TensorRT: the plan deserializes); otherwise it is removed and
    rebuilt. Concurrent callers of one key wait for the first, then find its result.
    """
    path = cache_dir / f"{key}{suffix}"
    with key_lock(cache_dir, key):
        if path.exists():
            complaint = _stale(path, meta) or usable(path)
            if complaint is None:
                return path, False
            log.warning("cached artifact rebuilt", extra={"path": str(path),
                                                          "reason": complaint})
            path.unlink(missing_ok=True)
            meta_path(path).unlink(missing_ok=True)
        data = build()
        atomic_write_bytes(path, data)
        write_meta(path, meta, hashlib.sha256(data).hexdigest(), len(data))
        return path, True


def write_meta(path: Path, meta: dict, sha256: str, size: int) -> None:
    """The sidecar of artifact ``path``: what it was made for, and its sha256 and length."""
    sidecar = {**meta, "sha256": sha256, "bytes": size}
    atomic_write_bytes(meta_path(path), json.dumps(sidecar, indent=1).encode())


def put(cache_dir: Path, key: str, suffix: str, source: Path, meta: dict,
        usable: Callable[[Path], str | None]) -> str | None:
    """Move ``source`` (an artifact made elsewhere for ``key``, in the same file system)
    into the cache as if built here; None, or the complaint of ``usable`` (then nothing of
    it is left in the cache). Under the key's lock, like a build."""
    path = cache_dir / f"{key}{suffix}"
    with key_lock(cache_dir, key):
        sha, size = file_sha256(source), Path(source).stat().st_size
        replace_synced(source, path)
        write_meta(path, meta, sha, size)
        complaint = usable(path)
        if complaint is not None:
            path.unlink(missing_ok=True)
            meta_path(path).unlink(missing_ok=True)
        return complaint


def evict(cache_dir: Path, key: str, suffix: str) -> None:
    """Remove the artifact of ``key`` and its sidecar (the next prepare builds it)."""
    path = cache_dir / f"{key}{suffix}"
    with key_lock(cache_dir, key):
        path.unlink(missing_ok=True)
        meta_path(path).unlink(missing_ok=True)


def _stale(path: Path, meta: dict) -> str | None:
    recorded = read_meta(path)
    if recorded is None:
        return "its sidecar is missing or unreadable"
    if {k: recorded.get(k) for k in meta} != meta:
        return "it was built for another device, engine version or build settings"
    if recorded.get("sha256") != file_sha256(path):
        return "its contents do not match the sha256 recorded when it was built"
    return None
