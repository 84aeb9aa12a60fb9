"""A verified release archive, unpacked into its own staging folder and nowhere else.

The archive must hold exactly the release's regular files at its top level: a member
with a path, a link, a device node or a name it should not have is refused before a
byte is written, so an archive can't write outside its staging directory.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from engines.files import copy_synced
from updater.errors import ReleaseError
from updater.fleet_repo import RELEASE_FILES

REQUIRED = ("model.onnx", "config.toml", "samples.npz")


def extract_release(archive: Path, dest: Path, max_bytes: int = 2 << 30,
                    only: tuple[str, ...] | None = None) -> Path:
    """Unpack ``archive`` into the new folder ``dest``; returns it. Raises ReleaseError.

    ``only``: write just these members (the whole archive is checked all the same)."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
            total = 0
            for m in members:
                if m.name not in RELEASE_FILES or not m.isreg():
                    raise ReleaseError(
                        f"{archive}: member {m.name!r} is not allowed in a release (only "
                        f"the regular files {', '.join(RELEASE_FILES)} at the top level)")
                total += m.size
            if total > max_bytes:
                raise ReleaseError(f"{archive}: unpacks to {total} bytes, over {max_bytes}")
            names = [m.name for m in members]
            missing = [n for n in REQUIRED if n not in names]
            if missing or len(set(names)) != len(names):
                raise ReleaseError(f"{archive}: needs each of {', '.join(REQUIRED)} once; "
                                   f"has {', '.join(names) or 'nothing'}")
            for m in members if only is None else [m for m in members if m.name in only]:
                # A new file: never through a link, never over an existing file.
                copy_synced(tar.extractfile(m), dest / m.name)
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ReleaseError(f"{archive}: not a readable release archive: {exc}") from exc
    except ReleaseError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
