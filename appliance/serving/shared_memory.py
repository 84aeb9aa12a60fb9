"""System shared memory regions: tensors that stay where the client put them.

Triton's system shared memory extension, one registry for every transport: a client creates
a POSIX shared memory object (``shm_open``: a file under /dev/shm), registers a window of it
by name, key, offset and byte size, then names the region in place of a tensor's bytes.
Inputs are read as NumPy views of the mapping (no copy); outputs are copied into it.

The mapping is the server's own (``mmap`` of the object, MAP_SHARED), so an object unlinked
after registration stays readable until the region is unregistered. An object truncated
after registration would turn a read past its new end into SIGBUS, which kills the
process: every access first checks the object's size (one ``fstat``). A region registered
over a socket connection belongs to it and is released when the connection closes; those
registered over HTTP or gRPC stay until unregistered, as in Triton.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np

from appliance.errors import InvalidArgument, NotFound, ResourceExhausted

SHM_DIR = "/dev/shm"  # where glibc's shm_open keeps its objects
MAX_REGIONS = 256  # each holds a mapping; a runaway client can't pile up thousands
_PAGE = mmap.ALLOCATIONGRANULARITY


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    __slots__ = ("status", "owner", "_map", "_base", "_end_in_object")

    def __init__(self, status: RegionStatus, owner: object, mapping: mmap.mmap, base: int):
        self.status = status
        self.owner = owner
        self._map = mapping
        self._base = base  # where the region starts in the mapping (page alignment)
        self._end_in_object = status.offset + status.byte_size

    def window(self, offset: int, byte_size: int, where: str) -> int:
        """The mapping offset of [offset, offset + byte_size) of the region, checked."""
        st = self.status
        if type(offset) is not int or offset < 0:
            raise InvalidArgument(f"{where}: the offset must be a non-negative integer, "
                                  f"not {offset!r}")
        if type(byte_size) is not int or byte_size < 0:
            raise InvalidArgument(f"{where}: the byte size must be a non-negative integer, "
                                  f"not {byte_size!r}")
        if offset + byte_size > st.byte_size:
            raise InvalidArgument(
                f"{where}: offset {offset} + {byte_size} bytes is past the end of region "
                f"'{st.name}' ({st.byte_size} bytes)")
        size = self._map.size()  # fstat of the object: it may have shrunk since
        if size < self._end_in_object:
            raise InvalidArgument(
                f"{where}: region '{st.name}' (key {st.key}) shrank to {size} bytes after it "
                f"was registered (it needs {self._end_in_object}); unregister it, then "
                f"register it again")
        return self._base + offset

    def view(self, start: int, dtype: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=start)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            # An input still being read (a queued or running batch) holds a view: the
            # mapping goes when the last view does.
            pass


class SharedMemoryRegistry:
    """The regions registered in this server, by name (one namespace for all transports)."""

    def __init__(self, shm_dir: str = SHM_DIR):
        self._dir = shm_dir
        self._regions: dict[str, _Region] = {}

    def register(self, name: object, key: object, offset: object, byte_size: object,
                 owner: object = None) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgument("'name' must be a non-empty string naming the region")
        if name in self._regions:
            raise InvalidArgument(f"a region named '{name}' is already registered; "
                                  f"unregister it first or pick another name")
        if len(self._regions) >= MAX_REGIONS:
            raise ResourceExhausted(f"{MAX_REGIONS} regions are registered, the most this "
                                    f"server maps; unregister some first")
        path = self._object_path(key)
        if type(offset) is not int or offset < 0:
            raise InvalidArgument(f"'offset' must be a non-negative integer, not {offset!r}")
        if type(byte_size) is not int or byte_size <= 0:
            raise InvalidArgument(f"'byte_size' must be a positive integer, not {byte_size!r}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"'key' {key!r}: no shared memory object {path}; create it "
                                  f"(shm_open) before registering it") from None
        except OSError as exc:
            raise InvalidArgument(f"'key' {key!r}: can't open {path} ({exc.strerror}); it "
                                  f"must be a shared memory object this server may read and "
                                  f"write") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument(f"'key' {key!r}: {path} is not a shared memory object")
            if offset + byte_size > info.st_size:
                raise InvalidArgument(
                    f"'offset' {offset} + 'byte_size' {byte_size} is past the end of {key!r} "
                    f"({info.st_size} bytes); register a window inside it")
            start = offset - offset % _PAGE
            try:
                mapping = mmap.mmap(fd, offset + byte_size - start, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
            except (OSError, ValueError, OverflowError) as exc:
                raise InvalidArgument(f"'key' {key!r}: can't map {byte_size} bytes at offset "
                                      f"{offset}: {exc}") from None
        finally:
            os.close(fd)  # the mapping keeps its own descriptor
        status = RegionStatus(name, key, offset, byte_size)
        self._regions[name] = _Region(status, owner, mapping, offset - start)

    def unregister(self, name: object = "", owner: object = None) -> list[str]:
        """Unregister ``name`` ("": every region, or every one of ``owner``'s when given).
        A name not registered is no error, as in Triton: it is not registered after."""
        if not isinstance(name, str):
            raise InvalidArgument("'name' must be a string ('' for every region)")
        if name:
            names = [name] if name in self._regions else []
        else:
            names = [n for n, r in self._regions.items() if owner is None or r.owner is owner]
        for n in names:
            self._regions.pop(n).close()
        return names

    def release(self, owner: object) -> None:
        """The owner (a connection) is gone: its regions go with it."""
        if any(r.owner is owner for r in self._regions.values()):
            self.unregister("", owner)

    def status(self, name: object = "") -> list[RegionStatus]:
        if not isinstance(name, str):
            raise InvalidArgument("'name' must be a string ('' for every region)")
        if name:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"no shared memory region named '{name}' is registered")
            return [region.status]
        return [self._regions[n].status for n in sorted(self._regions)]

    def read(self, region: object, offset: object, byte_size: object, dtype: np.dtype,
             shape: tuple[int, ...], where: str) -> np.ndarray:
        """A tensor's view of a region: no copy; read-only."""
        r = self._region(region, where)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        expected = count * dtype.itemsize
        if byte_size != expected:
            raise InvalidArgument(
                f"{where}: the window is {byte_size} bytes, but shape {list(shape)} of "
                f"{dtype.name} takes {expected} bytes")
        start = r.window(offset, byte_size, where)
        array = r.view(start, dtype, count).reshape(shape)
        array.flags.writeable = False
        return array

    def write(self, region: object, offset: object, byte_size: object, array: np.ndarray,
              where: str) -> None:
        """Copy an output into a region; it must fit the window the request named."""
        r = self._region(region, where)
        start = r.window(offset, byte_size, where)
        if array.nbytes > byte_size:
            raise InvalidArgument(
                f"{where}: the output takes {array.nbytes} bytes (shape {list(array.shape)} "
                f"of {array.dtype.name}); the window is {byte_size} bytes")
        target = r.view(start, array.dtype, array.size)
        target[...] = array.reshape(-1)

    def check_window(self, region: object, offset: object, byte_size: object,
                     where: str) -> None:
        """That the window lies in a registered region now (an output's, before the
        request runs: a bad one costs no inference)."""
        self._region(region, where).window(offset, byte_size, where)

    def close(self) -> None:
        self.unregister("")

    def _region(self, name: object, where: str) -> _Region:
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}: shared_memory_region must be a string")
        region = self._regions.get(name)
        if region is None:
            raise InvalidArgument(f"{where}: no shared memory region named '{name}' is "
                                  f"registered; register it first")
        return region

    def _object_path(self, key: object) -> str:
        """/dev/shm/NAME for a POSIX key ("/NAME", as shm_open takes it, or "NAME")."""
        if not isinstance(key, str):
            raise InvalidArgument("'key' must be a string, the shm_open name ('/NAME')")
        name = key.lstrip("/")
        if (not name or "/" in name or "\0" in name or name in (".", "..")
                or len(name.encode()) > 255):
            raise InvalidArgument(
                f"'key' {key!r} is not a shared memory object name: it must be '/NAME' "
                f"with no other '/', naming an object in {self._dir}")
        return os.path.join(self._dir, name)
