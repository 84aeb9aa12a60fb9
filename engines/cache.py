"""The engine cache: content-addressed artifacts under ``<data_dir>/engines``.

The key hashes everything that makes a prepared artifact valid on a device
(DESIGN section 3), and nothing else, so a restart finds what it built before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
