"""A release tarball (build/release.sh) as `outpost install --from` takes it: checked
against the SHA-256 beside it before a byte of it is unpacked, then unpacked safely.

A release is ``outpost-VERSION-linux-ARCH.tar.gz`` with ``...tar.gz.sha256`` beside it
(sha256sum's format), holding one folder ``outpost-VERSION-linux-ARCH/`` with the
executable ``outpost`` in it. A tarball whose checksum does not match, or that has no
checksum, is refused: a damaged or altered download never reaches /opt/outpost.
"""

from __future__ import annotations

import contextlib
import platform
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from appliance.errors import InvalidArgument
from engines.base import file_sha256

_NAME = re.compile(r"outpost-(?P<version>.+)-linux-(?P<arch>x86_64|aarch64)\.tar\.gz")
_SUM_LINE = re.compile(r"(?P<digest>[0-9a-fA-F]{64}) [ *](?P<name>.+)")


def is_release_archive(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".tgz"))


def check_sha256(archive: Path) -> str:
    """The archive's SHA-256, when it matches the ``.sha256`` file beside it; else refused."""
    sums = archive.with_name(archive.name + ".sha256")
    if not archive.is_file():
        raise InvalidArgument(f"--from {archive}: no such file")
    try:
        text = sums.read_text()
    except FileNotFoundError:
        raise InvalidArgument(
            f"--from {archive}: no {sums.name} beside it; a release is installed only "
            f"with its checksum: download {sums.name} too") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"--from {archive}: can't read {sums}: {exc}") from exc
    wanted = None
    for line in text.splitlines():
        match = _SUM_LINE.fullmatch(line.strip())
        if match and match.group("name").lstrip("*") == archive.name:
            wanted = match.group("digest").lower()
    if wanted is None:
        raise InvalidArgument(f"--from {archive}: {sums} has no SHA-256 line for "
                              f"{archive.name} (expected sha256sum's 'HEX  {archive.name}')")
    actual = file_sha256(archive)
    if actual != wanted:
        raise InvalidArgument(
            f"--from {archive}: its SHA-256 is {actual}, but {sums.name} says {wanted}: a "
            f"damaged or altered download, refused; nothing was installed. Fetch both again")
    return actual


def _check_arch(archive: Path) -> None:
    match = _NAME.fullmatch(archive.name)
    here = platform.machine()
    if match and here in ("x86_64", "aarch64") and match.group("arch") != here:
        raise InvalidArgument(f"--from {archive}: a release for {match.group('arch')}; this "
                              f"machine is {here}: install outpost-...-linux-{here}.tar.gz")


def _safe_members(archive: Path, tar: tarfile.TarFile) -> tuple[str, list[tarfile.TarInfo]]:
    """The one top folder and the members, refusing anything that would land outside it."""
    members = tar.getmembers()
    for m in members:
        path = PurePosixPath(m.name)
        unsafe = path.is_absolute() or ".." in path.parts
        if m.issym() or m.islnk():
            target = PurePosixPath(m.linkname)
            base = path.parent if m.issym() else PurePosixPath()
            unsafe |= target.is_absolute() or not _within(base / target, (path.parts or ("",))[0])
        unsafe |= not (m.isfile() or m.isdir() or m.issym() or m.islnk())
        if unsafe:
            raise InvalidArgument(f"--from {archive}: refused: its member {m.name!r} would "
                                  "land outside the release folder or is not a plain file")
    tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    top = next(iter(tops)) if len(tops) == 1 else ""
    if not top or not any(m.name.rstrip("/") == f"{top}/outpost" and m.isfile()
                          for m in members):
        raise InvalidArgument(f"--from {archive}: not an outpost release (it should hold one "
                              "folder with the 'outpost' executable in it)")
    return top, members


def _within(path: PurePosixPath, top: str) -> bool:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if not parts:
                return False
            parts.pop()
        elif part != ".":
            parts.append(part)
    return bool(parts) and parts[0] == top


@contextlib.contextmanager
def unpacked(archive: Path) -> Iterator[tuple[Path, str]]:
    """Check, then unpack into a temporary folder removed afterwards; yields the release's
    folder and its SHA-256."""
    digest = check_sha256(archive)
    _check_arch(archive)
    with tempfile.TemporaryDirectory(prefix="outpost-release-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                top, members = _safe_members(archive, tar)
                extra = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
                tar.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidArgument(f"--from {archive}: can't unpack it: {exc}") from exc
        yield Path(tmp) / top, digest
