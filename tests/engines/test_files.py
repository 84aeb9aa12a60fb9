"""engines/files.py: durable writes are whole or absent, never partial, and leave no litter.

Failures are made real: a file object whose write puts half the bytes down then raises
(a full disk), a rename that raises, a stream that breaks off.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import threading
from pathlib import Path

import pytest

from engines import files
from engines.files import (
    atomic_symlink,
    atomic_write_bytes,
    copy_synced,
    fsync_dir,
    replace_synced,
    write_synced,
)

OLD = b"old contents\n"
NEW = b"new contents, longer than the old ones\n" * 1000


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


class _HalfWrite(io.RawIOBase):
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, f, path: str, seen: list):
        super().__init__()
        self._f = f
        self._path = path
        self._seen = seen

    def write(self, data) -> int:
        data = bytes(data)
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        self._seen.append((self._path, mode_of(Path(self._path))))
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


@pytest.fixture
def half_writes(monkeypatch) -> list:
    """Every file opened through os.fdopen fails midway; records (temp path, its mode)."""
    seen: list = []
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{fd}")  # the file's path, for the record
        return _HalfWrite(real_fdopen(fd, *args, **kwargs), path, seen)

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    return seen


@pytest.fixture
def syncs(monkeypatch) -> list:
    """Records fsyncs (of a 'file' or a 'dir') and renames, in order."""
    events: list = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + ("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return events


# -- atomic_write_bytes --------------------------------------------------------------------


def test_atomic_write_creates_replaces_and_syncs_in_order(tmp_path, syncs):
    path = tmp_path / "sub" / "state.json"  # the folder is made if missing
    atomic_write_bytes(path, OLD)
    assert path.read_bytes() == OLD
    syncs.clear()
    atomic_write_bytes(path, NEW)
    assert path.read_bytes() == NEW
    assert syncs == ["fsync file", "replace", "fsync dir"]
    assert os.listdir(path.parent) == ["state.json"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_atomic_write_sets_the_mode_exactly(tmp_path, mode):
    path = tmp_path / "key.pem"
    atomic_write_bytes(path, OLD, 0o644)
    atomic_write_bytes(path, NEW, mode)
    assert mode_of(path) == mode  # whatever the umask, and over an older file's mode


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path, half_writes):
    path = tmp_path / "key.pem"
    path.write_bytes(OLD)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(path, NEW, 0o600)
    assert path.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["key.pem"]
    # The half-written temp file was beside the target and private while it existed.
    [(temp, temp_mode)] = half_writes
    assert Path(temp).parent == tmp_path and Path(temp).name.endswith(".tmp")
    assert temp_mode == 0o600


def test_a_write_that_fails_midway_leaves_no_file_where_there_was_none(tmp_path, half_writes):
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "new.json", NEW)
    assert os.listdir(tmp_path) == []


def test_an_interrupted_write_cleans_up_too(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_bytes(OLD)

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, NEW)
    assert path.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["state.json"]


def test_the_target_is_never_written_in_place(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_bytes(OLD)
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        # Up to the rename the target is the old file, and the temp is whole and final.
        seen.append((Path(dst).read_bytes(), Path(src).read_bytes(), mode_of(Path(src))))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write_bytes(path, NEW, 0o640)
    assert seen == [(OLD, NEW, 0o640)]


# -- replace_synced ------------------------------------------------------------------------


def test_replace_synced_fsyncs_renames_then_fsyncs_the_folder(tmp_path, syncs):
    tmp, path = tmp_path / ".x.part", tmp_path / "x"
    tmp.write_bytes(NEW)
    path.write_bytes(OLD)
    replace_synced(tmp, path)
    assert path.read_bytes() == NEW and not tmp.exists()
    assert syncs == ["fsync file", "replace", "fsync dir"]


def test_replace_synced_keeps_the_temp_file_when_the_rename_fails(tmp_path):
    tmp = tmp_path / ".x.part"
    tmp.write_bytes(NEW)
    (tmp_path / "x").mkdir()  # a folder where the file should go: rename refuses
    (tmp_path / "x" / "inside").write_bytes(OLD)
    with pytest.raises(OSError):
        replace_synced(tmp, tmp_path / "x")
    assert tmp.read_bytes() == NEW  # the caller may resume or retry from it


# -- write_synced, copy_synced -------------------------------------------------------------


def test_write_and_copy_synced_create_whole_synced_files(tmp_path, syncs):
    src = tmp_path / "src.bin"
    src.write_bytes(NEW)
    stage = tmp_path / "stage"
    stage.mkdir()
    syncs.clear()
    write_synced(stage / "config.toml", OLD)
    copy_synced(src, stage / "model.onnx")
    copy_synced(io.BytesIO(NEW), stage / "samples.npz")
    assert syncs == ["fsync file"] * 3
    assert (stage / "config.toml").read_bytes() == OLD
    assert (stage / "model.onnx").read_bytes() == NEW
    assert (stage / "samples.npz").read_bytes() == NEW
    for name in ("config.toml", "model.onnx", "samples.npz"):
        assert mode_of(stage / name) == 0o644 & ~umask()


def test_staged_files_are_never_written_over_a_file_or_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(OLD)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "link").symlink_to(outside)
    (stage / "there").write_bytes(OLD)
    for name in ("link", "there"):
        with pytest.raises(FileExistsError):
            write_synced(stage / name, NEW)
        with pytest.raises(FileExistsError):
            copy_synced(io.BytesIO(NEW), stage / name)
    assert outside.read_bytes() == OLD and (stage / "there").read_bytes() == OLD
    assert (stage / "link").is_symlink()


def test_a_copy_that_breaks_off_leaves_no_partial_file(tmp_path):
    class BrokenStream(io.RawIOBase):
        def __init__(self):
            self.sent = False

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            if self.sent:
                raise OSError(errno.EIO, "the archive broke off")
            self.sent = True
            buffer[:4] = b"half"
            return 4

    with pytest.raises(OSError, match="broke off"):
        copy_synced(BrokenStream(), tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_a_staged_write_that_fails_midway_leaves_no_partial_file(tmp_path, half_writes):
    with pytest.raises(OSError, match="No space left"):
        write_synced(tmp_path / "config.toml", NEW)
    assert half_writes and os.listdir(tmp_path) == []


# -- atomic_symlink ------------------------------------------------------------------------


def test_atomic_symlink_creates_and_switches(tmp_path, syncs):
    link = tmp_path / "opt" / "current"
    atomic_symlink(link, Path("1.0.0"))
    assert os.readlink(link) == "1.0.0"
    syncs.clear()
    atomic_symlink(link, Path("1.1.0"))
    assert os.readlink(link) == "1.1.0"
    assert syncs == ["replace", "fsync dir"]
    assert os.listdir(link.parent) == ["current"]


def test_a_symlink_switch_is_one_rename_over_the_old_link(tmp_path, monkeypatch):
    link = tmp_path / "current"
    atomic_symlink(link, Path("1.0.0"))
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        # Up to the rename the old link stands; the new one is complete beside it.
        seen.append((os.readlink(dst), os.readlink(src), Path(src).parent))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    atomic_symlink(link, Path("1.1.0"))
    assert seen == [("1.0.0", "1.1.0", tmp_path)]
    assert os.readlink(link) == "1.1.0"


def test_readers_always_find_the_link_while_it_switches(tmp_path):
    link = tmp_path / "current"
    atomic_symlink(link, Path("a"))
    stop = threading.Event()
    seen: set = set()
    missing: list = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(link))
            except FileNotFoundError as exc:
                missing.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            atomic_symlink(link, Path("b" if i % 2 else "a"))
    finally:
        stop.set()
        reader.join()
    assert missing == []
    assert seen <= {"a", "b"}


def test_a_failed_symlink_switch_leaves_no_temp_link(tmp_path):
    target = tmp_path / "current"
    target.mkdir()
    (target / "inside").write_bytes(OLD)  # a folder, not a link: rename refuses
    with pytest.raises(OSError):
        atomic_symlink(target, Path("1.0.0"))
    assert os.listdir(tmp_path) == ["current"] and target.is_dir()


def test_fsync_dir_needs_a_folder(tmp_path):
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
