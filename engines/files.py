"""Durable file writes: the one module that knows temp files, fsync and ``os.replace``.

Two shapes, both whole-or-nothing across a crash:

- one file: write a temp file in the same folder, fsync it, rename it over the target,
  fsync the folder (``atomic_write_bytes``; ``replace_synced`` when something else wrote
  the temp file; ``atomic_symlink`` for a link);
- a folder of files: create each in a staging folder (``write_synced``, ``copy_synced``),
  ``fsync_dir`` the staging folder, rename it into place, ``fsync_dir`` its parent.

Imports nothing of the appliance or the updater: every package may use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# A file created in a staging folder: never through a link, never over an existing file.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the whole new one."""
    # The temp file is created 0600 (mkstemp), so a private key is never readable on the
    # way; it gets ``mode`` only once it is whole.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_synced(tmp: Path, path: Path) -> None:
    """Rename ``tmp``, written whole by someone else in ``path``'s folder, over ``path``."""
    # fsync, rename, fsync the folder. On failure ``tmp`` stays: callers resume or redo it.
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` in one step: readers see the old target or the new."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` in a staging folder (renamed as a whole later) with ``data``, fsynced."""
    with _new_file(path) as f:
        f.write(data)


def copy_synced(src: Path | BinaryIO, path: Path) -> None:
    """Create ``path`` in a staging folder with the bytes of ``src`` (a file or a stream)."""
    with contextlib.ExitStack() as stack:
        fin = src if hasattr(src, "read") else stack.enter_context(open(src, "rb"))
        with _new_file(path) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable: after creating or renaming in it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[BinaryIO]:
    """A new file at ``path`` (0644 less the umask), fsynced on success, removed on failure."""
    fd = os.open(path, _NEW_FILE, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


__all__ = ["atomic_symlink", "atomic_write_bytes", "copy_synced", "fsync_dir",
           "replace_synced", "write_synced"]
